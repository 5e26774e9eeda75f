"""Scale-out on torch.distributed's launcher contract: ``torchrun --nproc_per_node 2`` (gloo on the
CPU) runs a study with units handed out through the c10d store and merges the ranks' results into
the one ``--out``: the tables are byte-identical to a single process's, also after a rank is
killed mid-run and the command rerun (finished units are not redone)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAKE_COCO
from dleaf_analysis.distributed import Place, place_from_env, slurm_array_shard

FILES = ("results.jsonl", "manifest.json", "summary.json", "events.parquet", "maps.parquet")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", **extra}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None) if k not in extra else None
    return env


COCO = ["--coco-images", str(FAKE_COCO / "val2014"), "--coco-annotations", str(FAKE_COCO / "instances_fake2014.json")]


def _dleaf(args: list, torchrun: bool = False, timeout: int = 600, **env):
    """``python -m dleaf_analysis ARGS`` in one process, or under ``torchrun --nproc_per_node 2``."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(_free_port())] if torchrun else [sys.executable]
    return subprocess.run([*launcher, "-m", "dleaf_analysis", *map(str, args)], env=_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def _study(model_dir, out, torchrun=False, **env):
    return _dleaf(["study", "ablation", "--model", model_dir, *COCO, "--limit", "6", "--out", out, "--json"], torchrun,
                  **env)


def test_place_from_the_launchers_environment():
    assert place_from_env({}) == Place()
    assert place_from_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Place(1, 4, 1, "torchrun")
    assert place_from_env({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}) == Place(3, 8, 1, "srun")
    assert slurm_array_shard({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "8",
                              "SLURM_ARRAY_TASK_MIN": "1"}) == (4, 8)
    with pytest.raises(ValueError, match="sbatch --array"):
        slurm_array_shard({})


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process_byte_for_byte(subword_dir, tmp_path):
    one = _study(subword_dir, tmp_path / "one")
    assert one.returncode == 0, one.stderr[-2000:]
    two = _study(subword_dir, tmp_path / "two", torchrun=True)
    assert two.returncode == 0, two.stderr[-2000:]
    for f in FILES:
        a, b = tmp_path / "one" / "ablation" / f, tmp_path / "two" / "ablation" / f
        assert a.read_bytes() == b.read_bytes(), f
    assert not list((tmp_path / "two" / "ablation").glob(".rank-*"))  # the ranks' stores were merged away
    n_units = len((tmp_path / "one" / "ablation" / "results.jsonl").read_text().splitlines())
    assert n_units >= 2  # more than one unit to share out
    # a rank that reaches a sweep late (without the barrier, after the other has recorded a unit) still
    # indexes the same list of units: none is skipped or run twice
    late = _study(subword_dir, tmp_path / "late", torchrun=True, DLEAF_TEST_LATE_RANK="1")
    assert late.returncode == 0, late.stderr[-2000:]
    for f in FILES:
        assert (tmp_path / "one" / "ablation" / f).read_bytes() == (tmp_path / "late" / "ablation" / f).read_bytes(), f
    # a rank killed after its first unit: the launch fails; the rerun resumes and ends identical
    killed = _study(subword_dir, tmp_path / "three", torchrun=True, DLEAF_TEST_KILL_RANK="1:1")
    assert killed.returncode != 0
    assert list((tmp_path / "three" / "ablation").glob(".rank-1/results.jsonl"))  # its finished unit is kept
    again = _study(subword_dir, tmp_path / "three", torchrun=True)
    assert again.returncode == 0, again.stderr[-2000:]
    for f in FILES:
        assert (tmp_path / "one" / "ablation" / f).read_bytes() == (tmp_path / "three" / "ablation" / f).read_bytes(), f


def _tune(model_dir, out, ids, torchrun=False):
    return _dleaf(["tune", "--model", model_dir, *COCO, "--image-ids", ids, "--out", out], torchrun, timeout=900)


@pytest.mark.slow
def test_torchrun_tuning_nested_sweeps_run_on_the_rank_that_drew_the_unit(subword_dir, tmp_path):
    """Tuning shares out configurations; each configuration's images (a nested sweep) run on the rank
    that drew it, without the process group.  The grid and the choice equal one process's."""
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join((FAKE_COCO / "image_ids.txt").read_text().split()[:2]))
    one = _tune(subword_dir, tmp_path / "one", ids)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _tune(subword_dir, tmp_path / "two", ids, torchrun=True)
    assert two.returncode == 0, two.stderr[-2000:]
    for f in ("grid.csv", "sensitivity.csv", "chosen.json"):
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
    assert not list((tmp_path / "two").glob("*/.rank-*"))


def _reproduce(model_dir, out, torchrun=False):
    return _dleaf(["reproduce", "--quick", "--model", model_dir, *COCO, "--image-ids", FAKE_COCO / "image_ids.txt",
                   "--out", out, "--json"], torchrun, timeout=1200)


@pytest.mark.slow
def test_torchrun_main_job_equals_one_process(subword_dir, tmp_path):
    """The main job under two ranks: evaluations, tuning and studies shared out, rank 0 alone writes the
    report; its tables equal one process's byte for byte."""
    one = _reproduce(subword_dir, tmp_path / "one")
    assert one.returncode == 0, one.stderr[-2000:]
    two = _reproduce(subword_dir, tmp_path / "two", torchrun=True)
    assert two.returncode == 0, two.stderr[-2000:]
    for f in ("methods_chair.csv", "comparisons.csv", "components.csv", "verdicts.json", "findings.md",
              "tuning/grid.csv", "test_images.txt"):
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
    assert (tmp_path / "two" / "report.md").is_file() and not list((tmp_path / "two").rglob(".rank-*"))
