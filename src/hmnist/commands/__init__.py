"""The user commands over trained runs: predict, compare, report (`hmnist <command>`, dispatched by cli).

Like the stages, they stand on the library modules only and read what the stages wrote (through
DVC at a revision, or from disk); none imports a stage.
"""
