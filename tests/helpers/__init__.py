"""Helpers shared by the tests, one package (tests/ is on sys.path: ``pythonpath`` in pyproject.toml).

- :mod:`.nnunet`: nnU-Net folders in a temporary directory and a runner for real nnU-Net commands;
- :mod:`.folders`: hand-made ``evaluate`` folders, trained folds and the fake checkpoint;
- :mod:`.probabilities`: synthetic probabilities and labels;
- :mod:`.cli`: the console script in this process and the one error line of a failing command;
- :mod:`.losses`: naive per-voxel loss references; :mod:`.ddp`: the two-process DDP worker;
- :mod:`.datasets`: (image, labels) arrays of generated datasets and nnU-Net's integrity check;
- :mod:`.failure`: synthetic cases for failure detection; :mod:`.disk`: a full disk;
- :mod:`.nnunet_fp16`: where nnU-Net's fp16 predictions can be compared closely;
- :mod:`.geometry_datasets`: generated datasets covering nnU-Net's geometries, planned once per session.
"""
