"""--report-to: what a 2-step run on tiny models sends to each tracker, read back with the tracker's own
reader (tensorboard's event reader, wandb's offline run file, trackio's database); a tracker that is
unknown, not installed, or failing mid-run. Each tracker's tests skip where its package is missing."""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

import train as T
import trackers


def run(built, four_prompts, out: Path, report_to: str, **kw) -> list[dict]:
    """Two steps with samples logged at each; returns metrics.jsonl's lines."""
    cfg = T.Config(gen=str(built["qwen2"]), verifier=str(built["gemma3"]), prompts=str(four_prompts), out=str(out),
                   group_size=2, prompts_per_step=2, micro_batch=4, max_new_tokens=5, max_steps=2, warmup_steps=1,
                   device="cpu", sample_every=1, num_samples=2, report_to=report_to, **kw)
    T.train(cfg)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_event_files_hold_every_scalar_the_config_and_the_samples(built, four_prompts, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lines = run(built, four_prompts, tmp_path / "run", "tensorboard")
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    for key in ("reward_mean", "loss", "distinct_1", "compression", "lr"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [1, 2]
        assert [e.value for e in events] == pytest.approx([m[key] for m in lines], rel=1e-6)  # float32 on disk
    texts = {tag: acc.Tensors(tag) for tag in acc.Tags()["tensors"]}
    config = texts["config/text_summary"][0].tensor_proto.string_val[0].decode()
    assert str(built["qwen2"]) in config and '"report_to": "tensorboard"' in config
    samples = texts["samples/text_summary"]
    assert [e.step for e in samples] == [1, 2]
    assert samples[0].tensor_proto.string_val[0].decode().startswith("| prompt | response | reward | tokens |")


def wandb_records(run_file: Path):
    """The protobuf records of a wandb run file: a 7-byte header, then LevelDB-log framed records
    (checksum 4, length 2, type 1: full, first, middle, last) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, or last of a split record
            record = pb.Record()
            record.ParseFromString(parts)
            yield record
            parts = b""


def test_wandb_offline_run_file_holds_every_scalar_the_config_and_the_samples(built, four_prompts, tmp_path,
                                                                              monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    lines = run(built, four_prompts, tmp_path / "run", "wandb")
    run_file, = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    history, config = {}, {}
    for r in wandb_records(run_file):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(items["_step"], {}).update(items)
        elif kind in ("run", "config"):  # the config comes with the run record, and any update after
            items = r.run.config.update if kind == "run" else r.config.update
            config.update({i.key: json.loads(i.value_json) for i in items})
    assert sorted(history) == [1, 2]
    for m in lines:
        for key in ("reward_mean", "loss", "distinct_1", "compression", "lr"):
            assert history[m["step"]][key] == pytest.approx(m[key], rel=1e-12)
        assert history[m["step"]]["samples/_type"] == "table-file"  # the table, in the run's files
    assert config["gen"] == str(built["qwen2"]) and config["report_to"] == "wandb"


def test_trackio_database_holds_every_scalar_the_config_and_the_samples(built, four_prompts, tmp_path, monkeypatch):
    pytest.importorskip("trackio")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    import trackio

    lines = run(built, four_prompts, tmp_path / "run", "trackio")
    logs = trackio.SQLiteStorage.get_logs(trackers.PROJECT, "run")
    scalars = {r["step"]: r for r in logs if "reward_mean" in r}
    tables = [r for r in logs if "samples" in r]
    assert sorted(scalars) == [1, 2] and [r["step"] for r in tables] == [1, 2]
    for m in lines:
        for key in ("reward_mean", "loss", "distinct_1", "compression", "lr"):
            assert scalars[m["step"]][key] == pytest.approx(m[key], rel=1e-12)
    assert [set(row) for row in tables[0]["samples"]["_value"]] == [{"prompt", "response", "reward", "tokens"}] * 2
    assert trackio.SQLiteStorage.get_run_config(trackers.PROJECT, "run")["gen"] == str(built["qwen2"])


def test_unknown_or_missing_tracker_is_one_line_before_any_work(monkeypatch, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        T.main(["--report-to", "mlflow", "--out", str(tmp_path / "a")])
    assert e.value.code == 2 and "invalid choice: 'mlflow'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets where it is not installed
    assert T.main(["--report-to", "wandb", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --report-to wandb needs the wandb package: pip install wandb"]
    assert not (tmp_path / "b").exists()


def test_a_tracker_failing_mid_run_costs_one_warning_and_nothing_else(built, four_prompts, tmp_path, monkeypatch,
                                                                      capsys):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    calls = []
    real = SummaryWriter.add_scalar

    def add_scalar(self, *a, **k):  # the writer raises at its 7th scalar, in step 1: a disk gone, say
        calls.append(a[0])
        if len(calls) == 7:
            raise OSError(28, "No space left on device")
        return real(self, *a, **k)
    monkeypatch.setattr(SummaryWriter, "add_scalar", add_scalar)
    lines = run(built, four_prompts, tmp_path / "run", "tensorboard")
    assert [m["step"] for m in lines] == [1, 2] and (tmp_path / "run" / "checkpoint-2").is_dir()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "--report-to" in line]
    assert warnings == ["warning: --report-to tensorboard failed at step 1 (OSError: [Errno 28] No space left on "
                        "device); the run goes on without it (metrics.jsonl has every step)"]
    assert len(calls) == 7  # off for the rest of the run
