"""Official EDM2 network pickles into an ``EDM2UNet2DModel`` and whole ``EDM2Pipeline`` folders.

The pickles are written by the tests themselves, the way the official training code writes them
(``official_pickles.py``).
"""

import importlib.util
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_unet_config, tiny_vae
from huggingface_hub import ModelCard
from official_pickles import (
    EasyDict,
    EDM2Loss,
    Payload,
    StabilityVAEEncoder,
    build_precond,
    dump_official,
    embedded_source,
    golden,
    random_unet,
    snapshot,
    write_pickle,
)

from edm2_diffusers import EDM2UNet2DModel
from edm2_diffusers.convert import from_official, to_official
from edm2_diffusers.convert.official_network import (
    extract_official_network,
    load_official_network,
    official_latent_encoder,
    official_pickle_to_unet,
)
from edm2_diffusers.convert.safe_unpickler import ObjectRecord, load_official_pickle
from edm2_diffusers.edm import denoise
from edm2_diffusers.hub import check_export, read_export_info
from edm2_diffusers.hub.converted import export_converted, official_std

# ---------------------------------------------------------------------------------------------------------------------
# Official-format pickles load into records and convert.


def test_golden_network_pickle_converts_and_matches_reference(tmp_path):
    config, state, tensors = golden()
    marker = tmp_path / "embedded-source-ran"
    path = tmp_path / "edm2-img16-golden.pkl"
    path.write_bytes(dump_official(snapshot(build_precond(state, config)), embedded_source(marker)))

    data = load_official_pickle(path)
    assert set(data) == {"encoder", "dataset_kwargs", "loss_fn", "ema"} and type(data) is dict
    assert data["dataset_kwargs"]["path"] == "img64.zip"
    assert data["loss_fn"].class_name == "EDM2Loss" and data["loss_fn"].attributes["P_mean"] == -0.8
    ema = data["ema"]
    assert isinstance(ema, ObjectRecord) and ema.class_name == "Precond"
    assert ema.module_src == embedded_source(marker) and ema.modules["unet"].modules["enc"].class_name == "ModuleDict"
    assert ema.modules["unet"].modules["enc"].modules["16x16_conv"].init_kwargs == {"kernel": [3, 3]}

    network = extract_official_network(data)
    assert network.class_name == "Precond"
    assert network.config == {
        **config,
        "use_fp16": True,
        "sigma_data": 0.5,
        "label_balance": 0.5,
        "concat_balance": 0.5,
        "dropout": 0,
        "res_balance": 0.3,
        "attn_balance": 0.3,
        "clip_act": 256,
        "resample_filter": [1, 1],
    }
    assert sorted(network.state_dict) == sorted(state)
    assert all(torch.equal(network.state_dict[k], v) for k, v in state.items())

    unet = from_official(network.state_dict, network.config)
    with torch.no_grad():
        D, logvar = denoise(unet, tensors["in.x"], tensors["in.sigma"], return_logvar=True)
    for ours, ref in ((D, tensors["out.denoised"]), (logvar, tensors["out.logvar"])):
        assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert not marker.exists() and not Path(f"{marker}.system").exists()
    assert "torch_utils" not in sys.modules and "dnnlib" not in sys.modules


def test_half_precision_snapshot_keeps_its_weights(tmp_path):
    config, state, _ = golden()
    path = tmp_path / "half.pkl"
    path.write_bytes(dump_official(snapshot(build_precond(state, config).half())))
    network = load_official_network(path)
    assert all(v.dtype == torch.float16 for v in network.state_dict.values())
    assert all(torch.equal(network.state_dict[k], v.half()) for k, v in state.items())
    unet = official_pickle_to_unet(path)
    assert unet.dtype == torch.float32
    assert torch.equal(unet.state_dict()["out_conv.weight"], state["unet.out_conv.weight"].half().float())


def test_class_conditional_round_trip(tmp_path):
    model = EDM2UNet2DModel(**tiny_unet_config(in_channels=2, out_channels=2, num_class_embeds=5)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    state, config = to_official(model)
    with open(tmp_path / "cond.pkl", "wb") as f:
        f.write(dump_official(snapshot(build_precond(state, config))))

    network = load_official_network(tmp_path / "cond.pkl")
    assert network.config["label_dim"] == 5 and "unet.emb_label.weight" in network.state_dict
    assert {k: network.config[k] for k in config} == config
    converted = official_pickle_to_unet(tmp_path / "cond.pkl")
    assert converted.config.num_class_embeds == 5
    x, sigma = torch.randn(4, 2, 8, 8), torch.tensor([0.002, 0.5, 3.0, 80.0])
    labels = torch.nn.functional.one_hot(torch.tensor([0, 4, 2, 4]), 5).float()
    with torch.no_grad():
        ref, ref_u = denoise(model, x, sigma, labels, return_logvar=True)
        out, out_u = denoise(converted, x, sigma, labels, return_logvar=True)
        other = denoise(converted, x, sigma, torch.tensor([1, 1, 1, 1]))
    assert (out - ref).abs().max() <= 1e-6 * ref.abs().max() and torch.allclose(out_u, ref_u, rtol=0, atol=1e-6)
    assert not torch.allclose(other, out)  # the labels matter


def test_latent_encoder_constants(tmp_path):
    config, state, _ = golden()
    blob = dump_official(snapshot(build_precond(state, config), StabilityVAEEncoder()))
    data = load_official_pickle(io.BytesIO(blob))
    assert isinstance(data["encoder"].attributes["scale"], np.ndarray)
    latent = official_latent_encoder(data)
    assert latent["vae_name"] == "stabilityai/sd-vae-ft-mse" and latent["final_std"] == 0.5
    assert latent["latents_mean"] == pytest.approx([5.81, 3.25, 0.12, -2.15], abs=1e-6)
    assert latent["latents_std"] == pytest.approx([4.17, 4.62, 3.71, 3.28], abs=1e-6)
    pixel = load_official_pickle(io.BytesIO(dump_official(snapshot(build_precond(state, config)))))
    assert official_latent_encoder(pixel) is None


def test_clear_errors_for_unusable_pickles(tmp_path):
    config, state, _ = golden()
    with pytest.raises(FileNotFoundError, match="network pickle not found"):
        load_official_pickle(tmp_path / "missing.pkl")
    with pytest.raises(ValueError, match="no 'ema' entry"):
        extract_official_network(load_official_pickle(io.BytesIO(dump_official(EasyDict(net=1)))))
    with pytest.raises(ValueError, match="unsupported network class 'EDM2Loss'"):
        extract_official_network({"ema": load_official_pickle(io.BytesIO(dump_official(EDM2Loss())))})
    net = build_precond(state, config)
    net._init_kwargs["label_dim"] = 10
    with pytest.raises(ValueError, match="label_dim: recorded 10 vs stored 0"):
        load_official_network(io.BytesIO(dump_official(snapshot(net))))
    net._init_kwargs = None
    with pytest.raises(ValueError, match="recorded no constructor arguments"):
        load_official_network(io.BytesIO(dump_official(snapshot(net))))
    with pytest.raises(ValueError, match="could not read the network pickle"):
        load_official_pickle(io.BytesIO(dump_official(snapshot(build_precond(state, config)))[:-100]))


# ---------------------------------------------------------------------------------------------------------------------
# Pipelines from official pickles, through the example script.


def _load_script():
    path = Path(__file__).resolve().parents[1] / "examples" / "convert_official.py"
    spec = importlib.util.spec_from_file_location("convert_official_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_converts_a_guided_class_conditional_pair(tmp_path):
    from edm2_diffusers import EDM2Pipeline, EDMHeunScheduler

    main, guide = random_unet(0, num_class_embeds=5), random_unet(1, model_channels=8)
    main_pkl, guide_pkl = write_pickle(tmp_path / "main.pkl", main), write_pickle(tmp_path / "guide.pkl", guide)
    out = tmp_path / "pipe"
    script = _load_script()
    args = [str(main_pkl), str(out), "--guidance", str(guide_pkl), "--guidance_scale", "1.7"]
    assert script.main(args) == out
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "guidance_unet" / "diffusion_pytorch_model.safetensors").is_file()
    info = json.loads((out / "export_info.json").read_text())
    assert info["guidance"] == {"source": "guide.pkl", "scale": 1.7, "class": "EDM2UNet2DModel"}
    assert info["conversion"]["sources"] == ["main.pkl"] and info["conversion"]["official_config"]["label_dim"] == 5
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "cc-by-nc-sa-4.0" and "`guidance_scale=1.7`" in card.text
    assert "converted from `guide.pkl`" in card.text and "| `main.pkl` |" in card.text
    assert (out / "guidance_unet" / "unet_edm2.py").is_file() and check_export(out) == [out]
    assert json.loads((out / "model_index.json").read_text())["default_guidance_scale"] == 1.7

    loaded = EDM2Pipeline.from_pretrained(out)
    reference = EDM2Pipeline(unet=main, scheduler=EDMHeunScheduler(), guidance_unet=guide)
    for pipe in (loaded, reference):
        pipe.set_progress_bar_config(disable=True)
    kw = dict(batch_size=2, num_inference_steps=3, class_labels=[1, 4], guidance_scale=1.7, output_type="np")
    a = loaded(generator=torch.Generator().manual_seed(0), **kw).images
    b = reference(generator=torch.Generator().manual_seed(0), **kw).images
    assert np.abs(a - b).max() <= 1e-5

    before = (out / "model_index.json").read_text()
    with pytest.raises(FileExistsError, match="not empty"):
        script.main([str(main_pkl), str(out)])
    assert (out / "model_index.json").read_text() == before and (out / "guidance_unet").is_dir()
    script.main([str(main_pkl), str(out), "--overwrite"])
    index = json.loads((out / "model_index.json").read_text())
    assert not (out / "guidance_unet").exists() and index["guidance_unet"] == [None, None]
    with pytest.raises(SystemExit):
        script.parse_args([str(main_pkl), str(out), "--guidance", str(guide_pkl)])


def test_pickles_of_one_network_become_weight_variants_that_both_loaders_read(tmp_path):
    from diffusers import DiffusionPipeline
    from test_export import run_loader

    from edm2_diffusers import EDM2Pipeline

    nets = [random_unet(0, num_class_embeds=5), random_unet(7, num_class_embeds=5)]
    names = ["edm2-img64-xs-0001234-0.050.pkl", "edm2-img64-xs-0001234-0.100.pkl"]
    pickles = [write_pickle(tmp_path / n, net) for n, net in zip(names, nets)]
    assert [official_std(p) for p in pickles] == [0.05, 0.1]
    out = tmp_path / "export"
    result = export_converted(pickles, out, base_model="alice/edm2-img64-xs", sample_grid=False)
    assert result.variants == [(0.05, "ema0050"), (0.1, "ema0100")]
    info = read_export_info(out)
    assert [v["source"] for v in info["variants"]] == names and info["conversion"]["sources"] == names
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "cc-by-nc-sa-4.0" and card.data.base_model == "alice/edm2-img64-xs"
    assert getattr(card.data, "base_model_relation", None) is None  # a conversion, not a fine-tune
    assert (
        f"| 0.100 | `ema0100` | `{names[1]}` |" in card.text and "creativecommons.org/licenses/by-nc-sa" in card.text
    )

    # Each variant holds its pickle's network, through both loaders; the default weights are the first pickle's.
    kw = dict(batch_size=2, num_inference_steps=2, class_labels=[1, 4], output_type="np")
    reference = {}
    for variant, net in ((None, nets[0]), ("ema0050", nets[0]), ("ema0100", nets[1])):
        pipe = EDM2Pipeline.from_pretrained(out, variant=variant)
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in pipe.unet.state_dict().items())
        remote = DiffusionPipeline.from_pretrained(out, variant=variant, trust_remote_code=True)
        images = [p(generator=torch.Generator().manual_seed(0), **kw).images for p in (pipe, remote)]
        np.testing.assert_allclose(images[0], images[1], atol=1e-6)
        reference[variant or "default"] = images[0]

    # A converted pipeline round-trips through save_pretrained, also where the package is not installed.
    saved = tmp_path / "saved"
    EDM2Pipeline.from_pretrained(out, variant="ema0100").save_pretrained(saved)
    assert read_export_info(saved)["conversion"]["sources"] == names and check_export(saved) == [saved]
    assert ModelCard.load(saved / "README.md").data.license == "cc-by-nc-sa-4.0"
    loaded = EDM2Pipeline.from_pretrained(saved)
    np.testing.assert_allclose(loaded(generator=torch.Generator().manual_seed(0), **kw).images, reference["ema0100"])
    report, _ = run_loader(saved, tmp_path / "blocked", block=True, snippets={}, variants=[None])
    assert report["variants"]["default"][1].startswith("diffusers_modules.")

    with pytest.raises(ValueError, match="gives no EMA std"):
        export_converted([pickles[0], write_pickle(tmp_path / "other.pkl", nets[1])], tmp_path / "x")
    with pytest.raises(ValueError, match="another architecture"):
        export_converted([pickles[0], write_pickle(tmp_path / "a-1-0.2.pkl", random_unet(1))], tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_latent_network_with_and_without_vae(tmp_path):
    from edm2_diffusers import EDM2Pipeline
    from edm2_diffusers.convert.official_pipeline import convert_official_pipeline, save_converted_pipeline

    model = random_unet(0, in_channels=4, out_channels=4)
    pkl = write_pickle(tmp_path / "latent.pkl", model, StabilityVAEEncoder())
    vae_dir = tmp_path / "vae"
    tiny_vae().save_pretrained(vae_dir)

    with_vae = save_converted_pipeline(convert_official_pipeline(pkl, vae=vae_dir), tmp_path / "with")
    pipe = EDM2Pipeline.from_pretrained(with_vae)
    assert pipe.vae is not None and pipe.config.latent_std == pytest.approx([4.17, 4.62, 3.71, 3.28], abs=1e-6)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()

    without = save_converted_pipeline(convert_official_pipeline(pkl), tmp_path / "without")
    readme = (without / "README.md").read_text()
    assert 'AutoencoderKL.from_pretrained("stabilityai/sd-vae-ft-mse")' in readme
    pipe = EDM2Pipeline.from_pretrained(without, vae=tiny_vae())
    assert pipe.config.latent_mean == pytest.approx([5.81, 3.25, 0.12, -2.15], abs=1e-6)
    assert pipe(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 3)


def test_pipeline_conversion_errors(tmp_path):
    from edm2_diffusers.convert.official_pipeline import convert_official_pipeline, save_converted_pipeline

    pkl = write_pickle(tmp_path / "pixel.pkl", random_unet(0))
    with pytest.raises(ValueError, match="together"):
        convert_official_pipeline(pkl, guidance_pickle=pkl)
    with pytest.raises(ValueError, match="works on pixels"):
        convert_official_pipeline(pkl, vae=tiny_vae())
    latent_guide = write_pickle(tmp_path / "latent.pkl", random_unet(1), StabilityVAEEncoder())
    with pytest.raises(ValueError, match="latent space"):
        convert_official_pipeline(pkl, guidance_pickle=latent_guide, guidance_scale=2.0)
    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    (unrelated / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a pipeline folder"):
        save_converted_pipeline(convert_official_pipeline(pkl), unrelated, overwrite=True)
    assert (unrelated / "keep.txt").read_text() == "mine" and len(list(tmp_path.iterdir())) == 3


# ---------------------------------------------------------------------------------------------------------------------
# Every refusal of the script is one line naming the problem and the file, exit status 1, nothing written.


def _bad_input(tmp_path, case: str):
    """``(argv, the file the message must name, a fragment of the message)`` for one kind of bad input."""
    good = write_pickle(tmp_path / "good.pkl", random_unet(0))
    bad, out = tmp_path / f"{case}.pkl", str(tmp_path / "pipe")
    if case == "missing":
        return [str(bad), out], bad, "network pickle not found"
    if case == "folder":
        bad.mkdir()
        return [str(bad), out], bad, "(it is a folder)"
    if case == "not-out-dir":  # an existing folder with someone's file in it
        (tmp_path / "pipe").mkdir()
        (tmp_path / "pipe" / "keep.txt").write_text("mine")
        return [str(good), out], tmp_path / "pipe", "exists and is not empty"
    blobs = {
        "json": (b'{"ema": 1}', "b'{' at offset 0 is not a pickle opcode"),
        "truncated": (good.read_bytes()[:-100], "could not read the network pickle"),
        "unsafe": (pickle.dumps({"ema": Payload(os.system, f"touch {tmp_path / 'ran'}")}), "refusing to load global"),
        "huge": (b"\x80\x04\x8e" + (1 << 30).to_bytes(8, "little") + b"abc", "declares 1073741824 bytes"),
        "deep": (b"(" * 100_000 + b"l" * 100_000 + b".", "nests its data"),
        "no-network": (dump_official(EasyDict(net=1)), "the pickle has no 'ema' entry"),
        "unsafe-guidance": (pickle.dumps({"ema": Payload(os.system, "true")}), "refusing to load global"),
    }
    if case == "zip":
        torch.save({"ema": torch.zeros(2)}, bad)
        return [str(bad), out], bad, "zip archive (as torch.save writes)"
    blob, fragment = blobs[case]
    bad.write_bytes(blob)
    if case == "unsafe-guidance":
        return [str(good), out, "--guidance", str(bad), "--guidance_scale", "1.5"], bad, fragment
    return [str(bad), out], bad, fragment


_CASES = ["missing", "folder", "json", "zip", "truncated", "unsafe", "huge", "deep", "no-network", "unsafe-guidance"]


@pytest.mark.parametrize("case", [*_CASES, "not-out-dir"])
def test_script_refusals_are_one_line_naming_the_file(tmp_path, capsys, case):
    argv, named, fragment = _bad_input(tmp_path, case)
    assert _load_script().cli(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.count("\n") == 1 and captured.err.startswith("convert_official.py: error: ")
    assert str(named) in captured.err and fragment in captured.err, captured.err
    if case == "not-out-dir":
        assert [p.name for p in (tmp_path / "pipe").iterdir()] == ["keep.txt"]
    else:
        assert not (tmp_path / "pipe").exists()
    assert not (tmp_path / "ran").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left behind


def test_script_refusal_from_the_command_line(tmp_path):
    argv, named, _ = _bad_input(tmp_path, "unsafe")
    script = Path(__file__).resolve().parents[1] / "examples" / "convert_official.py"
    env = {**os.environ, "PYTHONPATH": str(script.parents[1])}
    result = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, env=env)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"{named}: refusing to load global '{os.system.__module__}.system'" in result.stderr
    assert not (tmp_path / "ran").exists() and not (tmp_path / "pipe").exists()
