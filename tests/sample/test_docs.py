"""The user-facing docs work: the ComfyUI workflow is a consistent flow graph, the diffusers snippet runs
and makes the same image as `fm sample`."""
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _ui_graph():
    wf = json.loads((DOCS / "comfyui_workflow_flow_sd15.json").read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = {l[0]: l for l in wf["links"]}
    return wf, nodes, links


def test_comfyui_ui_workflow_is_a_consistent_flow_graph():
    wf, nodes, links = _ui_graph()
    for lid, src, src_slot, dst, dst_slot, typ in wf["links"]:
        assert nodes[src]["outputs"][src_slot]["type"] == typ and lid in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["type"] == typ and nodes[dst]["inputs"][dst_slot]["link"] == lid
    for n in nodes.values():  # every input is connected
        assert all(i["link"] in links for i in n["inputs"]), n["type"]

    def upstream(node, name):
        inp = next(i for i in node["inputs"] if i["name"] == name)
        return nodes[links[inp["link"]][1]]

    ks = next(n for n in nodes.values() if n["type"] == "KSampler")
    seed, _, steps, cfg, sampler, scheduler, denoise = ks["widgets_values"]
    assert (steps, cfg, sampler, scheduler, denoise) == (48, 6.0, "euler", "simple", 1.0)
    ms = upstream(ks, "model")
    assert ms["type"] == "ModelSamplingSD3" and 3.0 <= ms["widgets_values"][0] <= 4.0  # flow sampling on
    assert upstream(ms, "model")["type"] == "CheckpointLoaderSimple"
    assert upstream(ks, "latent_image")["widgets_values"][:2] == [768, 1024]
    pos, neg = upstream(ks, "positive"), upstream(ks, "negative")
    assert "masterpiece, good score, best quality, aesthetic" in pos["widgets_values"][0]
    assert "worst quality" in neg["widgets_values"][0]
    assert upstream(pos, "clip")["type"] == "CLIPSetLastLayer" and upstream(pos, "clip")["widgets_values"] == [-2]


def test_comfyui_api_workflow_matches_the_ui_one():
    api = json.loads((DOCS / "comfyui_workflow_flow_sd15_api.json").read_text())
    _, nodes, _ = _ui_graph()
    assert {k: v["class_type"] for k, v in api.items()} == {str(i): n["type"] for i, n in nodes.items()}
    ks = next(v for v in api.values() if v["class_type"] == "KSampler")["inputs"]
    assert api[ks["model"][0]]["class_type"] == "ModelSamplingSD3" and api[ks["model"][0]]["inputs"]["shift"] == 3.0
    assert (ks["steps"], ks["cfg"], ks["sampler_name"], ks["scheduler"]) == (48, 6.0, "euler", "simple")
    assert api["4"]["inputs"]["text"] == nodes[4]["widgets_values"][0]


def test_diffusers_snippet_runs_and_matches_fm_sample(tiny, model_cache, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from tasks.models.load import save_diffusers_folder
    from tasks.sample.main import sample_main

    folder = tmp_path / "diffusers"
    save_diffusers_folder(tiny.components, folder, scheduler_config=FlowMatchEulerDiscreteScheduler(shift=3.0))
    doc = (DOCS / "using_the_checkpoint.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    small = "num_inference_steps=4, guidance_scale=6.0, width=64, height=64"
    edits = [(r'model_dir = ".*?"', f"model_dir = {str(folder)!r}"), (r'device = "cuda"', 'device = "cpu"'),
             (r"num_inference_steps=48, guidance_scale=6.0, width=768, height=1024", small),
             (r'image.save\("out.png"\)', f"image.save({str(tmp_path / 'doc.png')!r})")]
    for pattern, repl in edits:
        code, n = re.subn(pattern, repl, code)
        assert n == 1, pattern  # the snippet still has the shape this test expects
    exec(compile(code, "using_the_checkpoint.md", "exec"), {})
    doc_img = np.asarray(Image.open(tmp_path / "doc.png").convert("RGB")).astype(int)
    ours = sample_main(str(folder), "1girl, solo, long hair, smile, masterpiece, good score, best quality, aesthetic",
                       "worst quality, bad score, sketch", out_dir=tmp_path / "fm", steps=4, width=64, height=64,
                       seed=0, cache_dir=model_cache, device="cpu", grid=False)
    fm_img = np.asarray(Image.open(ours[0]).convert("RGB")).astype(int)
    assert doc_img.std() > 5
    assert np.abs(doc_img - fm_img).max() <= 1
