"""What users look for in the train output: readable export names (`<run>.safetensors`, `<run>-e0003.safetensors`,
`latest.safetensors`), epoch exports that survive a kill, kohya-style `ss_*` metadata, files other users can
read, and a ComfyUI workflow that names the file the pipeline writes."""
from __future__ import annotations

import json
import os
import stat
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from data_contracts.errors import ConfigError
from data_contracts.verify import verify_output
from pipeline_config.load import load_config
from pipeline_config.train import TrainConfig
from tasks.common.stage import run_stage
from tasks.models.single_file import (UNET_PREFIX, embedded_configs, make_tree_readable, read_checkpoint,
                                      read_metadata, unet_diffusers_to_ldm)
from tasks.train import export as ex
from tasks.train.loop import run_training
from tasks.train.stage import SPEC, run_name

from .conftest import base_train, kill_worker_after, run_spec

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# ------------------------------------------------------------------------------------------ pure parts

def test_default_run_name_follows_the_config_name_and_the_comfyui_workflows_use_it():
    recipe, demo = load_config("nai-v2-fm"), load_config("demo")
    assert run_name(recipe) == "booruflow-nai-v2-fm" and run_name(demo) == "booruflow-demo"
    assert run_name(load_config("demo", ["train.run_name=my-chars-v2"])) == "my-chars-v2"
    assert ex.default_run_name("my preset/x") == "booruflow-my-preset-x" and ex.default_run_name("") == "booruflow"
    with pytest.raises(ConfigError, match="reserved"):
        ex.resolve_run_name(TrainConfig(run_name="latest"), "demo")
    with pytest.raises(ValueError):
        TrainConfig(run_name="../escape")
    # the docs' ComfyUI workflows load what the recipe writes
    final = ex.final_export_name(run_name(recipe))
    api = json.loads((DOCS / "comfyui_workflow_flow_sd15_api.json").read_text())
    assert [n["inputs"]["ckpt_name"] for n in api.values() if n["class_type"] == "CheckpointLoaderSimple"] == [final]
    ui = json.loads((DOCS / "comfyui_workflow_flow_sd15.json").read_text())
    assert [n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "CheckpointLoaderSimple"] == [final]
    assert final in (DOCS / "using_the_checkpoint.md").read_text()


def test_a_new_run_name_is_a_new_output():
    cfg = load_config("demo")
    assert SPEC.fingerprint_extra(cfg) != SPEC.fingerprint_extra(load_config("demo", ["name=other"]))
    assert SPEC.fingerprint_extra(cfg) == SPEC.fingerprint_extra(load_config("demo", ["train.run_name=booruflow-demo"]))


def test_epoch_export_names_and_when_they_are_due():
    assert ex.epoch_export_name("run", 3) == "run-e0003.safetensors"
    assert ex.export_epoch("run", "run-e0003.safetensors") == 3
    assert ex.export_epoch("run", "run-b-e0003.safetensors") is None  # another run's file
    assert ex.export_epoch("run", "run.safetensors") is None and ex.export_epoch("run", "latest.safetensors") is None
    # 4 micro-batches an epoch, accumulation 2: epochs end at micro-batches 4, 8, 12
    due = {mb: ex.epoch_export_due(mb, 2, 4, every=2) for mb in range(2, 17, 2)}
    assert due == {2: None, 4: None, 6: None, 8: 2, 10: None, 12: None, 14: None, 16: 4}
    assert ex.epoch_export_due(8, 2, 4, every=0) is None
    # accumulation windows longer than an epoch: the newest epoch that ended, when a multiple ended
    assert ex.epochs_ended(9, 3, 2) == [4] and ex.epoch_export_due(12, 3, 2, every=5) == 6


def test_prune_drop_latest_and_temp_cleanup(tmp_path):
    for e in (1, 2, 3, 4):
        (tmp_path / ex.epoch_export_name("r", e)).write_bytes(b"x")
    (tmp_path / "other-e0001.safetensors").write_bytes(b"x")
    assert [p.name for p in ex.prune_epoch_exports(tmp_path, "r", keep=2)] == ["r-e0001.safetensors",
                                                                               "r-e0002.safetensors"]
    assert ex.prune_epoch_exports(tmp_path, "r", keep=0) == []
    assert ex.refresh_latest(tmp_path, "r") == "r-e0004.safetensors"
    link = tmp_path / ex.LATEST
    assert link.is_symlink() and os.readlink(link) == "r-e0004.safetensors"  # relative: survives a folder rename
    assert [p.name for p in ex.drop_epoch_exports_after(tmp_path, "r", 3)] == ["r-e0004.safetensors"]
    assert ex.refresh_latest(tmp_path, "r") == "r-e0003.safetensors"
    (tmp_path / "r.safetensors").write_bytes(b"final")
    assert ex.refresh_latest(tmp_path, "r") == "r.safetensors" and link.read_bytes() == b"final"
    stale = [tmp_path / ".r.safetensors.4242.tmp", tmp_path / ".r.safetensors.4242.tmp.canon",
             tmp_path / ".latest.safetensors.4242.link"]
    for p in stale:
        p.write_bytes(b"half")
    (tmp_path / ".keep-me").write_bytes(b"x")
    assert sorted(ex.clean_export_temps(tmp_path)) == sorted(stale)
    assert (tmp_path / ".keep-me").exists() and (tmp_path / "other-e0001.safetensors").exists()


def test_dataset_summary_counts_training_rows_only():
    ids = [1, 2, 3, 4]
    sizes = [(512, 512), (448, 576), (512, 512), (512, 512)]
    tags = [["1girl", "smile", "smile"], ["1girl", "frieren"], ["1boy", ""], ["held out"]]
    data = ex.summarise_rows("cache-x", ids, sizes, tags, keep=lambda i: i != 4)
    assert data.images == 3 and data.buckets == {(512, 512): 2, (448, 576): 1}
    assert data.tags == Counter({"1girl": 2, "smile": 1, "frieren": 1, "1boy": 1})  # once per image
    assert list(ex.top_tags(data.tags, 3)) == ["1girl", "1boy", "frieren"]  # count, then name
    assert ex.base_resolution(data.buckets) == 512 and ex.base_resolution({(448, 576): 1}) == 448
    assert ex.bucket_info(data.buckets) == {"buckets": {"0": {"resolution": [448, 576], "count": 1},
                                                        "1": {"resolution": [512, 512], "count": 2}}}


def test_kohya_metadata_is_all_strings_with_kohya_shapes():
    cfg = TrainConfig.model_validate(base_train(batch_size=3, grad_accum=5, optimizer="adamw8bit"))
    data = ex.summarise_rows("cache-x", [1, 2], [(512, 512)] * 2, [["1girl", "smile"], ["1girl"]], keep=lambda i: True)
    facts = ex.RunFacts(run_name="r", started_at=1.7e9, epoch=2, num_epochs=4, steps=10, max_steps=20, world_size=2,
                        base_model="/models/nai.safetensors", base_identity="ab" * 32, finished_at=1.7e9 + 60)
    meta = ex.kohya_metadata(cfg, facts, data)
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_output_name"] == meta["modelspec.title"] == "r" and meta["ss_epoch"] == "2"
    assert (meta["ss_num_train_images"], meta["ss_num_epochs"], meta["ss_steps"]) == ("2", "4", "10")
    assert (meta["ss_batch_size_per_device"], meta["ss_gradient_accumulation_steps"], meta["ss_total_batch_size"]) \
        == ("3", "5", "30")
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False" and meta["ss_clip_skip"] == "2"
    assert meta["ss_resolution"] == "(512, 512)" and meta["ss_sd_model_name"] == "nai.safetensors"
    assert meta["ss_optimizer"].startswith("bitsandbytes.optim.AdamW8bit(")
    assert json.loads(meta["ss_tag_frequency"]) == {"cache-x": {"1girl": 2, "smile": 1}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"cache-x": {"n_repeats": 1, "img_count": 2}}
    assert json.loads(meta["ss_bucket_info"])["buckets"]["0"] == {"resolution": [512, 512], "count": 2}
    assert not {"ss_training_started_at", "ss_training_finished_at", "ss_session_id", "modelspec.date"} & set(meta)
    many = ex.summarise_rows("d", list(range(600)), [(64, 64)] * 600, [[f"tag{i}"] for i in range(600)],
                             keep=lambda i: True)
    assert len(json.loads(ex.kohya_metadata(cfg, facts, many)["ss_tag_frequency"])["d"]) == ex.TOP_TAGS


def test_make_tree_readable_undoes_safetensors_and_mkdtemp_modes(tmp_path, umask022):
    folder = Path(tempfile.mkdtemp(dir=tmp_path))  # 0700
    save_file({"a": torch.zeros(2)}, str(folder / "w.safetensors"))  # safetensors >= 0.5: 0600
    os.symlink("w.safetensors", folder / "link.safetensors")
    assert _mode(folder) == 0o700
    make_tree_readable(folder)
    assert (_mode(folder), _mode(folder / "w.safetensors")) == (0o755, 0o644)
    os.umask(0o027)  # a stricter umask is respected, not overridden
    make_tree_readable(folder)
    assert (_mode(folder), _mode(folder / "w.safetensors")) == (0o750, 0o640)


# ------------------------------------------------------------------------------------ through training

def _unet_ldm(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path, (UNET_PREFIX,))


def test_stage_writes_named_epoch_exports_with_metadata_readable_by_others(make_cache, model_cache, umask022):
    store, cache = make_cache(n=16, buckets=((64, 64), (128, 64)))
    # 16 samples, batch 2, accumulation 2: 4 optimiser steps an epoch; 3 epochs; an export each epoch, 1 kept
    train = base_train(epochs=3, batch_size=2, grad_accum=2, export_every_epochs=1, keep_exports=1,
                       export_dtype="fp32", export_diffusers=True, keep_checkpoint_in_output=True,
                       checkpoint_every=4, keep_last=3, validation={"fraction": 0.2})
    cfg = load_config({"name": "demo", "data_root": store.root_url,
                       "runtime": {"device": "cpu", "cache_dir": str(model_cache)}, "train": train})
    out = run_stage(SPEC, cfg, store, progress=lambda f, m: None)
    m = out.manifest
    folder = Path(store.output_path("train", m.fingerprint))
    assert m.checkpoint == "booruflow-demo.safetensors" and m.steps == 12
    assert m.stats["run_name"] == "booruflow-demo"
    assert m.stats["exports"] == [{"epoch": 2, "step": 8, "path": "booruflow-demo-e0002.safetensors"}]
    names = sorted(p.name for p in folder.glob("*.safetensors"))
    assert names == ["booruflow-demo-e0002.safetensors", "booruflow-demo.safetensors", "latest.safetensors"]
    assert os.readlink(folder / "latest.safetensors") == "booruflow-demo.safetensors"
    assert "booruflow-demo-e0002.safetensors" in {f.path for f in m.files}
    assert not verify_output(store, m).problems  # no stray temp file, the link resolves inside the output
    assert "booruflow-demo-e0002.safetensors" in out.report.summary_md

    # readable by a ComfyUI service running as another user: no 0600 / 0700 anywhere
    for p in [folder, *folder.rglob("*")]:
        if not p.is_symlink():
            assert _mode(p) == (0o755 if p.is_dir() else 0o644), (p, oct(_mode(p)))

    # the epoch export holds the weights of the end of epoch 2 (step 8), in the final export's format
    epoch2, final = folder / "booruflow-demo-e0002.safetensors", folder / m.checkpoint
    config = embedded_configs(read_metadata(epoch2))["unet"]
    at8 = unet_diffusers_to_ldm(load_file(str(folder / "checkpoints/step-00000008/unet.safetensors")), config)
    got = _unet_ldm(epoch2)
    assert got.keys() == at8.keys()
    for k in got:
        torch.testing.assert_close(got[k], at8[k], rtol=0, atol=0, msg=k)
    assert read_checkpoint(epoch2).keys() == read_checkpoint(final).keys()

    me, mf = read_metadata(epoch2), read_metadata(final)
    assert me.keys() == mf.keys()
    assert (me["ss_epoch"], me["ss_steps"], mf["ss_epoch"], mf["ss_steps"]) == ("2", "8", "3", "12")
    assert me["ss_output_name"] == mf["ss_output_name"] == "booruflow-demo"
    assert me["booruflow.objective"] == "flow" and me["modelspec.prediction_type"] == "rectified-flow"
    kept = int(me["ss_num_train_images"])
    assert 0 < kept < 16  # held-out validation rows are not training images
    freq = json.loads(me["ss_tag_frequency"])
    assert list(freq) == [f"cache-{cache.fingerprint[:8]}"]
    assert freq[f"cache-{cache.fingerprint[:8]}"]["1girl"] == kept  # every training caption has it
    buckets = json.loads(me["ss_bucket_info"])["buckets"]
    assert sum(b["count"] for b in buckets.values()) == kept


@pytest.mark.parametrize("checkpoint_every", [3, 4], ids=["export-after-checkpoint", "export-at-checkpoint"])
def test_kill_and_resume_neither_loses_nor_duplicates_epoch_exports(make_cache, model_cache, tmp_path,
                                                                    checkpoint_every, umask022, monkeypatch):
    """Exports at steps 4 (epoch 1) and 8 (epoch 2), final at 12; killed after step 5. With checkpoints every 3
    steps the resumed run starts at 3 and replays the epoch-1 export; every 4 it starts at 4 and keeps it."""
    store, manifest = make_cache(n=16, buckets=((64, 64), (128, 64)))
    recipe = dict(epochs=3, batch_size=2, grad_accum=2, export_every_epochs=1, export_dtype="fp32",
                  checkpoint_every=checkpoint_every, ema={"enabled": True, "decay": 0.9}, run_name="r")
    straight = run_training(run_spec(store, manifest, tmp_path / "straight", model_cache, **recipe))
    assert straight["steps"] == 12 and [e["epoch"] for e in straight["exports"]] == [1, 2]

    work = tmp_path / "killed"
    spec = run_spec(store, manifest, work, model_cache, **recipe)
    kill_worker_after(spec, work / "run.json", 5)
    assert sorted(p.name for p in work.glob("*.safetensors")) == ["latest.safetensors", "r-e0001.safetensors"]
    assert _mode(work / "r-e0001.safetensors") == 0o644  # readable while training goes on, not only once committed
    os.utime(work / "r-e0001.safetensors", (0, 0))  # marked: a rewrite (temp + rename) brings a new mtime
    stale = work / ".r-e0002.safetensors.99999.tmp"  # as a kill in the middle of writing epoch 2 leaves it
    stale.write_bytes(b"half")

    from tasks.models import single_file

    real, seen = single_file.export_single_file, []

    def watched(unet, vae, text_encoder, path, **kw):  # what the folder holds when the resumed run exports
        seen.append((Path(path).name, sorted(p.name for p in work.iterdir() if "safetensors" in p.name)))
        return real(unet, vae, text_encoder, path, **kw)

    monkeypatch.setattr(single_file, "export_single_file", watched)
    resumed = run_training(spec)
    assert resumed["exports"] == straight["exports"] and resumed["checkpoint"] == "r.safetensors"
    if checkpoint_every == 3:  # the killed attempt's epoch-1 export came after checkpoint 3: gone before the replay
        assert seen[0] == ("r-e0001.safetensors", [])
    else:  # it came before checkpoint 4: it stays, and is not written twice
        assert seen[0] == ("r-e0002.safetensors", ["latest.safetensors", "r-e0001.safetensors"])
    assert sorted(p.name for p in work.iterdir() if "safetensors" in p.name) == \
        ["latest.safetensors", "r-e0001.safetensors", "r-e0002.safetensors", "r.safetensors"]
    assert os.readlink(work / "latest.safetensors") == "r.safetensors"
    for name in ("r-e0001.safetensors", "r-e0002.safetensors", "r.safetensors"):
        a, b = read_checkpoint(tmp_path / "straight" / name), read_checkpoint(work / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=f"{name}: {k}")  # bit-identical on CPU
        assert read_metadata(work / name) == read_metadata(tmp_path / "straight" / name)
        # no wall-clock key: the resumed run's file is the uninterrupted run's, byte for byte
        assert (work / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()
    assert not stale.exists()
    # resumed at step 4 the epoch-1 export is the killed attempt's own; resumed at 3 it was made again
    rewritten = (work / "r-e0001.safetensors").stat().st_mtime != 0
    assert rewritten == (checkpoint_every == 3)


def test_an_export_cut_short_is_written_by_the_resumed_run(make_cache, model_cache, tmp_path, monkeypatch):
    """A kill while the epoch-1 export is being written (step 4, which is also a checkpoint step): the checkpoint
    of that step must not exist yet, or the resumed run would start after the epoch end and never export it."""
    from tasks.models import single_file

    class Killed(BaseException):
        pass

    real = single_file.export_single_file

    def dies_half_way(unet, vae, text_encoder, path, **kw):
        Path(path).with_name(f".{Path(path).name}.{os.getpid()}.tmp").write_bytes(b"half")  # as a kill leaves it
        raise Killed()

    store, manifest = make_cache(n=16, buckets=((64, 64), (128, 64)))
    spec = run_spec(store, manifest, tmp_path / "w", model_cache, epochs=2, batch_size=2, grad_accum=2,
                    export_every_epochs=1, checkpoint_every=4, run_name="r")
    monkeypatch.setattr(single_file, "export_single_file", dies_half_way)
    with pytest.raises(Killed):
        run_training(spec)
    assert not (tmp_path / "w" / "checkpoints" / "LATEST").exists()
    monkeypatch.setattr(single_file, "export_single_file", real)
    result = run_training(spec)
    assert result["exports"] == [{"epoch": 1, "step": 4, "path": "r-e0001.safetensors"}]
    assert sorted(p.name for p in (tmp_path / "w").iterdir() if "safetensors" in p.name) == \
        ["latest.safetensors", "r-e0001.safetensors", "r.safetensors"]
