"""nnunet_mbls.trainers.catalog: the catalog agrees with the trainer classes and the loss registry."""

from __future__ import annotations


def test_trainer_catalog_agrees_with_the_trainer_classes_and_the_loss_registry():
    """``nnunet-mbls trainers`` prints the catalog; the classes read their loss from it: same names, order, values."""
    from nnunet_mbls.losses import LOSSES
    from nnunet_mbls.trainers import TRAINERS, __all__ as exported
    from nnunet_mbls.trainers.catalog import CATALOG, LOSS_CLASS_NAMES

    assert [spec.name for spec in CATALOG] == [cls.__name__ for cls in TRAINERS]
    for spec, cls in zip(CATALOG, TRAINERS):
        assert (cls.loss_name, cls.loss_kwargs) == (spec.loss_name, spec.loss_kwargs), cls.__name__
        assert LOSSES[cls.loss_name].__name__ == spec.loss_class_name, cls.__name__
        assert cls.loss_kwargs is not spec.loss_kwargs  # a class cannot change the catalog
    assert LOSS_CLASS_NAMES == {name: loss.__name__ for name, loss in LOSSES.items()}
    assert set(exported) == {cls.__name__ for cls in TRAINERS} | {"nnUNetTrainerCalibrated", "TRAINERS"}
