"""nnunet_mbls.data.msd: the Decathlon layout refuses bad names and counts."""

from __future__ import annotations

import pytest

from nnunet_mbls.data.synthetic import make_synthetic_dataset


def test_msd_layout_refuses_bad_names_and_counts(tmp_path):
    from nnunet_mbls.data.msd import task_folder_name, write_msd_task

    with pytest.raises(ValueError, match="no '_'"):
        task_folder_name(5, "My_Task")
    source = make_synthetic_dataset(tmp_path / "raw", dataset_id=22, num_cases=2, shape=(16, 16))
    with pytest.raises(ValueError, match="num_test=2 is invalid.*2 cases"):
        write_msd_task(source, tmp_path / "msd", 22, "Small", num_test=2)
    assert not (tmp_path / "msd" / "Task22_Small").exists()
