import json
import re

import pytest
import torch

from invdiff_rt.errors import InvdiffError
from invdiff_rt.models.checkpoint import load_checkpoint, save_checkpoint
from invdiff_rt.models.loader import load_model, model_fingerprint, resolve_model, tokenize, weights_variant
from invdiff_rt.models.tokenizer import build_tokenizer


def test_tokenizer_word_level_with_bos_eos_and_padding():
    tok = build_tokenizer(["a photo of the digit 3", "a photo of the digit 7"], max_length=8)
    ids = tok(["a photo of the digit 3", "", "an unseen word"], padding="max_length", max_length=8).input_ids
    bos, eos, pad, unk = (tok.convert_tokens_to_ids(t) for t in (tok.bos_token, tok.eos_token, tok.pad_token,
                                                                  tok.unk_token))
    assert ids[0][0] == bos and ids[0][7] == eos and len(set(ids[0][1:7])) == 6 and unk not in ids[0]
    assert ids[1][:3] == [bos, eos, pad]
    assert ids[2][:5] == [bos, unk, unk, unk, eos]


def test_tokenizer_knows_every_word_of_its_captions():
    """Its vocabulary is made by its own pre-tokenizer: punctuation, accents and non-Latin words were unknown (the
    vocabulary held [a-z0-9]+ words only), so "a café" and "a crème" were the same conditioning."""
    captions = ["a café", "a crème", "一只红色的鸟", "一只蓝色的鸟", "a red bird, on water"]
    tok = build_tokenizer(captions, max_length=12)
    ids = tok(captions).input_ids
    assert len({tuple(i) for i in ids}) == len(captions) and all(tok.unk_token_id not in i for i in ids)


def test_random_model_round_trip_through_loader(tiny_model_dir, tiny_model):
    m = tiny_model
    assert m.latent_shape == (4, 8, 8) and m.image_size == 32
    emb = m.encode_text(["a photo of the digit 3", ""])
    assert emb.shape == (2, 16, m.text_encoder.config.hidden_size)
    lat = m.encode_images(torch.zeros(2, 3, 32, 32))
    assert lat.shape == (2, 4, 8, 8)
    img = m.decode(lat)
    assert img.shape == (2, 3, 32, 32) and 0 <= img.min() and img.max() <= 1
    assert not any(p.requires_grad for p in m.unet.parameters())
    assert m.fingerprint == model_fingerprint(tiny_model_dir) and len(m.fingerprint) == 64


def test_a_prompt_longer_than_the_text_encoder_reads_is_truncated_with_one_note(tiny_model, caplog):
    limit = tiny_model.tokenizer.model_max_length  # 16 in the tiny model (77 in SD)
    long = "a photo of the digit 4 " * limit
    with caplog.at_level("WARNING"):
        ids = tokenize(tiny_model.tokenizer, ["a photo of the digit 4", long])
        again = tokenize(tiny_model.tokenizer, [long], return_tensors="np")  # a later batch: no second note
    assert ids.shape == (2, limit) and again.shape == (1, limit) and (ids[1].numpy() == again[0]).all()
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and f"has {6 * limit + 2} tokens; the text encoder reads the first {limit}" in notes[0]


def test_stable_diffusion_pipeline_loads_the_same_directory(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None,
                                                   requires_safety_checker=False)
    out = pipe("a photo of the digit 3", num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 32, 32, 3)


def test_a_model_with_only_fp16_variant_weights_loads_the_same(tmp_path, tiny_model_dir, tiny_model):
    """Hugging Face repositories ship SD's weights as `*.fp16.safetensors` too; a folder with only those loads."""
    import shutil

    variant = shutil.copytree(tiny_model_dir, tmp_path / "m")
    for weights in [*variant.glob("*/diffusion_pytorch_model.safetensors"), *variant.glob("*/model.safetensors")]:
        weights.rename(weights.with_suffix(".fp16.safetensors"))
    assert weights_variant(variant / "unet") == "fp16" and weights_variant(variant / "text_encoder") == "fp16"
    m = load_model(variant)
    x, t, emb = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), tiny_model.encode_text(["a", ""])
    assert torch.equal(m.unet(x, t, encoder_hidden_states=emb).sample,
                       tiny_model.unet(x, t, encoder_hidden_states=emb).sample)
    assert torch.equal(m.encode_text(["a photo of the digit 3"]), tiny_model.encode_text(["a photo of the digit 3"]))


@pytest.mark.parametrize("names, variant", [
    (["config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"], None),
    (["config.json", "diffusion_pytorch_model-00001-of-00002.safetensors"], None),
    (["config.json", "diffusion_pytorch_model.fp16-00001-of-00002.safetensors"], "fp16"),
    (["config.json", "model.bf16.safetensors"], "bf16"),
    (["config.json"], None)])
def test_weights_variant(tmp_path, names, variant):
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert weights_variant(tmp_path) == variant


def test_resolve_model_errors(tmp_path):
    with pytest.raises(InvdiffError, match="no model_index.json"):
        resolve_model(tmp_path)
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(InvdiffError, match="missing component"):
        resolve_model(tmp_path)
    (tmp_path / "v1-5-pruned-emaonly.safetensors").write_bytes(b"weights")  # as users download SD
    with pytest.raises(InvdiffError, match=r"^--model .*emaonly.safetensors: a single-file checkpoint; convert it "
                                           r"to a diffusers folder once .*from_single_file"):
        resolve_model(tmp_path / "v1-5-pruned-emaonly.safetensors")


def test_fingerprint_changes_with_weights(tmp_path, tiny_model_dir):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(tiny_model_dir, copy)
    before = model_fingerprint(copy)
    (copy / "onnx").mkdir()  # an export beside the components (Hugging Face's layout), notes, logs: not the model
    (copy / "onnx" / "manifest.json").write_text("{}")
    (copy / "notes.txt").write_text("trained on ...")
    assert model_fingerprint(copy) == before
    from invdiff_rt.artifacts import fingerprint_dir
    from invdiff_rt.models.loader import matches_model

    legacy = fingerprint_dir(copy, suffixes=(".safetensors", ".json", ".txt", ".bin"), exclude=("invdiff_model.json",))
    assert legacy != before and matches_model(legacy, copy) and matches_model(before, copy)  # older artifacts load
    assert not matches_model("0" * 64, copy)
    cfg = copy / "unet" / "config.json"
    data = json.loads(cfg.read_text())
    data["_note"] = "edited"
    cfg.write_text(json.dumps(data))
    assert model_fingerprint(copy) != before
    assert load_model(copy).fingerprint != before


def test_checkpoint_round_trip_restores_module_and_optimizer(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(4, 3)).sum().backward()
        opt.step()
    save_checkpoint(tmp_path / "ck", {"net": net}, opt, step=3, extra={"note": "x"})
    net2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(net2.parameters(), lr=1e-2)
    meta = load_checkpoint(tmp_path / "ck", {"net": net2}, opt2)
    assert meta["step"] == 3 and meta["note"] == "x"
    assert torch.equal(net.weight, net2.weight)
    x = torch.randn(4, 3)
    for o, n in ((opt, net), (opt2, net2)):
        o.zero_grad()
        n(x).sum().backward()
        o.step()
    assert torch.allclose(net.weight, net2.weight, atol=0, rtol=0)
    before = (tmp_path / "ck" / "state.safetensors").read_bytes()
    with torch.no_grad():
        net.bias[0] = float("inf")  # overflowed by a step whose loss was still finite
    with pytest.raises(InvdiffError, match=r"ck: weight net.bias is not finite at step 4 \(training diverged\)"):
        save_checkpoint(tmp_path / "ck", {"net": net}, opt, step=4)
    assert (tmp_path / "ck" / "state.safetensors").read_bytes() == before  # the last finite checkpoint stays


def test_interrupted_checkpoint_save_leaves_the_previous_one(tmp_path, monkeypatch):
    from invdiff_rt.models import checkpoint

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    save_checkpoint(tmp_path / "ck", {"net": net}, opt, step=3)
    saved = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "atomic_write_json", killed)  # dies after the tensors were written
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "ck", {"net": net}, opt, step=4)
    monkeypatch.undo()
    fresh = torch.nn.Linear(3, 2)
    meta = load_checkpoint(tmp_path / "ck", {"net": fresh}, torch.optim.AdamW(fresh.parameters(), lr=1e-2))
    assert meta["step"] == 3 and torch.equal(fresh.weight, saved)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary folder left behind


@pytest.mark.slow
def test_pretrain_cli_few_steps_and_resume(tmp_path):
    from typer.testing import CliRunner

    from invdiff_rt.cli import app
    from invdiff_rt.data.recipes import RECIPES

    data = RECIPES["colored-digits"](tmp_path / "data", bias=0.95, seed=0, size=32)
    out = tmp_path / "model"
    args = ["pretrain", "--data", str(data), "--out", str(out), "--steps", "4", "--vae-steps", "2",
            "--batch-size", "8", "--checkpoint-every", "2"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    info = json.loads((out / "invdiff_model.json").read_text())
    assert info["data_fingerprint"] and info["parameters"]["unet"] > 0 and info["recipe"]["steps"] == 4
    assert info["resumed_from_step"] == {"vae": 0, "unet": 0}
    m = load_model(out)
    assert m.scaling_factor != 0.18215
    ck = json.loads((tmp_path / "model.ckpt" / "unet" / "state.json").read_text())
    assert ck["step"] == 4
    # resume: a larger --steps continues from the checkpoint (step 4) instead of restarting
    res = CliRunner().invoke(app, args[:6] + ["6"] + args[7:])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "model.ckpt" / "unet" / "state.json").read_text())["step"] == 6
    info = json.loads((out / "invdiff_model.json").read_text())
    assert info["resumed_from_step"] == {"vae": 2, "unet": 4} and info["recipe"]["steps"] == 6
    # what shapes the steps may not change on resume: another seed or learning rate is refused in one line (it
    # resumed the seed-0 weights and recorded seed 1 in invdiff_model.json)
    res = CliRunner().invoke(app, args[:6] + ["8"] + args[7:] + ["--seed", "1"])
    assert res.exit_code != 0 and "checkpoint was made with other data, --seed" in str(res.exception)
    assert json.loads((tmp_path / "model.ckpt" / "unet" / "state.json").read_text())["step"] == 6
    assert json.loads((out / "invdiff_model.json").read_text())["seed"] == 0
    before = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    # a shorter --steps than the checkpoint holds is refused (it returned the longer model, labelled shorter)
    res = CliRunner().invoke(app, args[:6] + ["2"] + args[7:])
    assert "--steps 2: the unet checkpoint is already at step 6; pass --steps 6 or more" in str(res.exception)
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    # a diverged run writes no model and keeps the last (finite) checkpoint
    res = CliRunner().invoke(app, ["pretrain", "--data", str(data), "--out", str(tmp_path / "nan"), "--steps", "6",
                                   "--vae-steps", "1", "--batch-size", "8", "--warmup", "0", "--lr", "1e30",
                                   "--checkpoint-every", "2"])
    assert re.search(r"pretrain: the unet loss is (nan|inf) at step \d \(training diverged\)", str(res.exception))
    assert not (tmp_path / "nan").exists()
    (tmp_path / "file.ckpt").write_text("")
    res = CliRunner().invoke(app, args[:4] + [str(tmp_path / "file")] + args[5:])
    assert "file.ckpt (its checkpoint folder) is a file; move it away" in str(res.exception)
    res = CliRunner().invoke(app, args[:4] + [str(tmp_path / "m2")] + args[5:] + ["--init-from", str(tmp_path)])
    assert str(res.exception).startswith(f"--init-from {tmp_path}: not a diffusers model directory")
    assert not (tmp_path / "file").exists() and not (tmp_path / "m2").exists()


def test_pretrain_sizes_the_text_encoder_to_the_longest_caption():
    """At the default 16 tokens, captions of more than 14 words were cut silently: two that differ at the end
    trained as one prompt. From scratch the text encoder now reads the longest caption whole."""
    from invdiff_rt.models.configs import MiniSDArch
    from invdiff_rt.models.pretrain import fit_tokens

    words = " ".join(f"w{i % 5}" for i in range(19))  # repeated words count each time
    long = [f"{words} red", f"{words} green", "a short one, really"]
    arch = fit_tokens(MiniSDArch(), long)
    assert arch.max_tokens == 22 and fit_tokens(MiniSDArch(), ["a photo of the digit 3"]) == MiniSDArch()
    tok = build_tokenizer(long, arch.max_tokens)
    first, second = tokenize(tok, long[:2]).tolist()
    assert first != second and tok.eos_token_id in first


def test_captions_with_words_the_tokenizer_does_not_know_are_refused(tiny_model, tmp_path):
    """The built-in models' word-level vocabularies read every unknown word as one token: "a photo of a cat" and
    "... dog" would be one prompt. groups/train/calibrate (through the latent cache) and eval refuse such captions."""
    from types import SimpleNamespace

    from invdiff_rt.method.cache import base_inputs
    from invdiff_rt.models.loader import unknown_word_prompts

    captions = ["a photo of a cat", "a photo of a dog"]
    assert unknown_word_prompts(tiny_model.tokenizer, captions) == captions
    clip_like = SimpleNamespace(unk_token_id=7, eos_token_id=7, bos_token_id=6, pad_token_id=7)
    assert unknown_word_prompts(clip_like, captions) == []  # byte-level BPE: its unk is its end token
    data = tmp_path / "data" / "train"
    data.mkdir(parents=True)
    from PIL import Image

    for i, text in enumerate(captions):
        Image.new("RGB", (32, 32)).save(data / f"{i}.png")
    (data / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": t}) + "\n"
                                                 for i, t in enumerate(captions)))
    with pytest.raises(InvdiffError, match=r"^--data: the model's tokenizer does not know the words of \['a photo "
                                           r"of a cat', 'a photo of a dog'\].*invdiff pretrain"):
        base_inputs(tiny_model, tmp_path / "data")


def test_an_unwritable_cache_folder_is_a_note_not_a_traceback(tiny_model, tmp_path, monkeypatch, caplog):
    """INVDIFF_CACHE_DIR naming a file reached a NotADirectoryError traceback in every stage that reads the data;
    the cache is an optimisation, so the stage goes on with one note."""
    from PIL import Image

    from invdiff_rt.method.cache import base_inputs

    data = tmp_path / "data" / "train"
    data.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (32, 32), (200 * i, 0, 0)).save(data / f"{i}.png")
    (data / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": "a photo of the digit "
                                                             f"{i}"}) + "\n" for i in range(2)))
    (tmp_path / "cache").write_text("not a folder")
    monkeypatch.setenv("INVDIFF_CACHE_DIR", str(tmp_path / "cache"))
    inputs = base_inputs(tiny_model, tmp_path / "data")
    assert inputs.latents.shape[0] == 2 and inputs.prompts == ["a photo of the digit 0", "a photo of the digit 1"]
    assert [r.getMessage() for r in caplog.records] == [
        f"note: base inputs not cached, {tmp_path / 'cache'} is not a writable folder (Not a directory); set "
        "INVDIFF_CACHE_DIR to one"]
