from PIL import Image

from tasks.sample.pngmeta import GenerationInfo, parse_parameters, read_png_info, save_png

A1111_TEXT = (
    "masterpiece, 1girl, (red hair:1.2), aoi \\(series\\)\n"
    "Negative prompt: (worst quality, bad score:1.1), sketch\n"
    "Steps: 48, Sampler: Euler, Schedule type: Simple, CFG scale: 6, Seed: 1234, Size: 768x1024, "
    "Model hash: 0123456789, Model: nai-fm, Clip skip: 2, "
    'Lora hashes: "a: 1f2e, b: 3d4c", Version: v1.10.1'
)


def test_parse_a1111_infotext():
    info = parse_parameters(A1111_TEXT)
    assert info.prompt == "masterpiece, 1girl, (red hair:1.2), aoi \\(series\\)"
    assert info.negative_prompt == "(worst quality, bad score:1.1), sketch"
    assert info.params["Steps"] == "48" and info.params["CFG scale"] == "6"
    assert info.params["Size"] == "768x1024" and info.params["Clip skip"] == "2"
    assert info.params["Lora hashes"] == "a: 1f2e, b: 3d4c"  # quoted value with commas and colons
    assert info.to_text() == A1111_TEXT  # and it writes back byte for byte


def test_png_round_trip(tmp_path):
    info = GenerationInfo(
        prompt="1girl, (smile:1.2),\nsecond line with ünïcödé ✓",
        negative_prompt='bad "quotes", worst: quality',
        params={"Steps": "48", "Sampler": "DPM++ SDE", "CFG scale": 6.5, "Seed": "7",
                "Model": "my, model: v2", "Shift": 3.0, "Note": '"quoted"'},
    )
    path = save_png(tmp_path / "a.png", Image.new("RGB", (16, 24), (10, 20, 30)), info)
    back = read_png_info(path)
    assert back is not None
    assert back.prompt == info.prompt and back.negative_prompt == info.negative_prompt
    assert back.params == {"Steps": "48", "Sampler": "DPM++ SDE", "CFG scale": "6.5", "Seed": "7",
                           "Model": "my, model: v2", "Shift": "3", "Note": '"quoted"'}
    with Image.open(path) as im:
        assert im.size == (16, 24) and im.getpixel((0, 0)) == (10, 20, 30)
    assert not list(tmp_path.glob("*.tmp"))


def test_prompt_only_and_missing_chunk(tmp_path):
    info = parse_parameters("just a prompt, with: colon")
    assert info.prompt == "just a prompt, with: colon" and info.params == {}
    path = save_png(tmp_path / "b.png", Image.new("RGB", (8, 8)), None)
    assert read_png_info(path) is None
