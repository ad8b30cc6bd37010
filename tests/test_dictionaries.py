"""Dictionary folders in each format, written by hand as their trainers write them, load to
the numbers each trainer's own encoder gives (its math written out here)."""

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import reftgraph as rg

D_IN, D_SAE = 6, 16


def weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(D_IN, D_SAE, generator=g), "b_enc": 0.1 * torch.randn(D_SAE, generator=g),
            "W_dec": torch.randn(D_SAE, D_IN, generator=g), "b_dec": 0.3 * torch.randn(D_IN, generator=g),
            "threshold": 0.5 * torch.rand(D_SAE, generator=g)}


X = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(9))


def topk(pre, k):
    keep = pre.topk(k, dim=-1).indices
    return torch.zeros_like(pre).scatter(-1, keep, pre.gather(-1, keep).clamp(min=0))


def sae_lens_folder(tmp_path, arch="standard", extra=None, tensors=None, hook="blocks.1.hook_resid_post"):
    w = weights()
    tensors = tensors if tensors is not None else {k: v for k, v in w.items() if k != "threshold" or arch == "jumprelu"}
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none", "architecture": arch,
           "metadata": {"sae_lens_version": "6.54.12", "hook_name": hook, "model_name": "tiny-llama"}, **(extra or {})}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(tmp_path / "sae_weights.safetensors"))
    return w


def test_sae_lens_standard_jumprelu_and_topk(tmp_path):
    for arch, extra in (("standard", {}), ("jumprelu", {}), ("topk", {"k": 4})):
        folder = tmp_path / arch
        folder.mkdir()
        w = sae_lens_folder(folder, arch, extra)
        sae = rg.features.load(folder)
        pre = (X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
        want = {"standard": pre.relu(), "jumprelu": pre.relu() * (pre > w["threshold"]), "topk": topk(pre, 4)}[arch]
        torch.testing.assert_close(sae.encode(X), want)
        torch.testing.assert_close(sae.decode(want), want @ w["W_dec"] + w["b_dec"])
        assert (sae.trained_at, sae.model, sae.name) == ("resid_post[1]", "tiny-llama", arch)


def test_sae_lens_topk_with_decoder_norm_rescaling_is_folded(tmp_path):
    w = sae_lens_folder(tmp_path, "topk", {"k": 3, "rescale_acts_by_decoder_norm": True})
    n = w["W_dec"].norm(dim=-1)
    pre = ((X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * n          # sae-lens: pre-activations times the norms
    f = topk(pre, 3)
    sae = rg.features.load(tmp_path)
    torch.testing.assert_close(sae.encode(X), f)
    torch.testing.assert_close(sae.decode(f), (f / n) @ w["W_dec"] + w["b_dec"])


def test_sae_lens_batchtopk_runs_as_jumprelu_with_its_threshold(tmp_path):
    w = weights()
    tensors = {k: w[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")} | {"topk_threshold": torch.tensor(0.4)}
    sae_lens_folder(tmp_path, "batchtopk", {"k": 4}, tensors)
    pre = (X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    torch.testing.assert_close(rg.features.load(tmp_path).encode(X), pre.relu() * (pre > 0.4))


def test_sparsify_folder(tmp_path):
    w = weights()
    folder = tmp_path / "layers.2"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": 32, "normalize_decoder": True,
                                                 "num_latents": D_SAE, "k": 4, "multi_topk": False,
                                                 "skip_connection": False, "transcode": False, "d_in": D_IN}))
    save_file({"encoder.weight": w["W_enc"].T.contiguous(), "encoder.bias": w["b_enc"], "W_dec": w["W_dec"],
               "b_dec": w["b_dec"]}, str(folder / "sae.safetensors"))
    sae = rg.features.load(folder)
    pre = ((X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu()       # sparsify: ReLU, then the top k
    values, idx = pre.topk(4, dim=-1)
    torch.testing.assert_close(sae.encode(X), torch.zeros_like(pre).scatter(-1, idx, values))
    assert sae.trained_at == "resid_post[2]"
    with pytest.raises(rg.DictionaryFileError, match=r"holds dictionaries in \['layers.2'\]: load one of them"):
        rg.features.load(tmp_path)


def test_gemma_scope_2_and_1(tmp_path):
    w = weights()
    two = tmp_path / "resid_post" / "layer_1_width_16k_l0_medium"
    two.mkdir(parents=True)
    (two / "config.json").write_text(json.dumps({"architecture": "jump_relu", "model_name": "google/gemma-3-270m",
                                                 "hf_hook_point_in": "model.layers.1.output"}))
    save_file({k.lower() if k.startswith("W") else k: v for k, v in w.items()}, str(two / "params.safetensors"))
    one = tmp_path / "layer_3" / "width_16k" / "average_l0_50"
    one.mkdir(parents=True)
    np.savez(one / "params.npz", **{k: v.numpy() for k, v in w.items()})
    pre = X @ w["W_enc"] + w["b_enc"]                                # no b_dec subtracted
    want = pre.relu() * (pre > w["threshold"])
    for folder, site in ((two, "resid_post[1]"), (one, "resid_post[3]"), (one / "params.npz", "resid_post[3]")):
        sae = rg.features.load(folder)
        torch.testing.assert_close(sae.encode(X), want)
        assert sae.trained_at == site


def test_dictionary_learning_ae_pt_is_read_without_unpickling_code(tmp_path):
    w = weights()
    relu = tmp_path / "relu"
    relu.mkdir()
    torch.save({"bias": w["b_dec"], "encoder.weight": w["W_enc"].T, "encoder.bias": w["b_enc"],
                "decoder.weight": w["W_dec"].T}, relu / "ae.pt")
    (relu / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder", "layer": 1,
                                                              "lm_name": "tiny", "submodule_name": "resid_post_layer_1"}}))
    torch.testing.assert_close(rg.features.load(relu).encode(X), ((X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu())
    assert rg.features.load(relu).trained_at == "resid_post[1]"
    top = tmp_path / "topk"
    top.mkdir()
    torch.save({"encoder.weight": w["W_enc"].T, "encoder.bias": w["b_enc"], "decoder.weight": w["W_dec"].T,
                "b_dec": w["b_dec"], "k": torch.tensor(3), "threshold": torch.tensor(-1.0)}, top / "ae.pt")
    pre = ((X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu()
    torch.testing.assert_close(rg.features.load(top).encode(X), topk(pre, 3))
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "ae.pt").write_bytes(pickle.dumps(print, protocol=2))                 # a pickle that would call code
    with pytest.raises(rg.DictionaryFileError, match=r"weights_only=True.*never unpickles"):
        rg.features.load(evil)


class _Cfg:
    d_in, d_sae, apply_b_dec_to_input, normalize_activations, k = D_IN, D_SAE, True, "none", 3

    class metadata:
        hook_name, model_name = "blocks.0.hook_mlp_out", "tiny"

    @staticmethod
    def architecture():
        return "topk"


class _LiveSAE:
    """What sae-lens's SAE object looks like to load (duck-typed; sae-lens is not needed)."""

    def __init__(self):
        self.cfg = _Cfg()
        for k, v in weights().items():
            setattr(self, k, torch.nn.Parameter(v))


def test_a_live_sae_lens_object():
    live = _LiveSAE()
    sae = rg.features.load(live)
    pre = (X - live.b_dec) @ live.W_enc + live.b_enc
    torch.testing.assert_close(sae.encode(X), topk(pre.detach(), 3))
    assert sae.trained_at == "mlp_out[0]" and sae.k == 3


def test_what_cannot_run_exactly_is_refused(tmp_path):
    cases = {
        "gated": ("gated", {}, r"architecture 'gated'; reftgraph reads"),
        "norm": ("standard", {"normalize_activations": "constant_norm_rescale"}, "rescales each token by its own norm"),
        "z": ("standard", {}, "hook_z"),
    }
    for name, (arch, extra, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        sae_lens_folder(folder, arch, extra, hook="blocks.1.attn.hook_z" if name == "z" else "blocks.1.hook_resid_post")
        with pytest.raises(rg.DictionaryFileError, match=message):
            rg.features.load(folder)
    coder = tmp_path / "transcoder"
    coder.mkdir()
    w = weights()
    save_file({**{k: w[k] for k in ("W_enc", "b_enc")}, "W_dec": torch.randn(D_SAE, 9), "b_dec": torch.zeros(9)},
              str(coder / "sae_weights.safetensors"))
    (coder / "cfg.json").write_text(json.dumps({"d_in": D_IN, "d_sae": D_SAE, "architecture": "standard"}))
    with pytest.raises(rg.DictionaryFileError, match="do not say it is a transcoder"):
        rg.features.load(coder)
    broken = tmp_path / "broken"
    broken.mkdir()
    save_file({**{k: w[k] for k in ("W_enc", "b_enc", "W_dec")}, "b_dec": torch.zeros(D_IN + 1)},
              str(broken / "sae_weights.safetensors"))
    (broken / "cfg.json").write_text(json.dumps({"d_in": D_IN, "d_sae": D_SAE, "architecture": "standard"}))
    with pytest.raises(rg.DictionaryFileError, match=r"b_dec has shape \[7\]; with the encoder \[6, 16\] it must be \[6\]"):
        rg.features.load(broken)
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.bin").write_bytes(b"")
    with pytest.raises(rg.DictionaryFileError, match=r"holds \['model.bin'\]\. Formats read:\n  sae-lens"):
        rg.features.load(other)


def test_a_loaded_dictionary_is_checked_against_the_site(tmp_path):
    lm = rg.models.tiny("llama")
    folder = tmp_path / "sae"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"W_enc": torch.randn(32, 64, generator=g), "b_enc": torch.zeros(64), "W_dec": torch.randn(64, 32, generator=g),
               "b_dec": torch.zeros(32)}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": 32, "d_sae": 64, "architecture": "standard",
                                                 "metadata": {"hook_name": "blocks.1.hook_resid_post"}}))
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=0), rg.Collect(basis=rg.features.load(folder)), name="f")
    with pytest.raises(rg.SiteError, match="dictionary 'sae' was trained at resid_post\\[1\\], not at resid_post\\[0\\]"):
        g.run(lm, ["ab"])
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=-1), rg.Collect(basis=rg.features.load(folder)), name="f")
    assert g.run(lm, ["ab"])["f"].shape == (1, 2, 64)                 # layer -1 is layer 1 of 2
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=0), rg.Collect(basis=rg.features.load(folder, strict=False)), name="f")
    with pytest.warns(UserWarning, match="strict=False"):
        g.run(lm, ["ab"])


def test_transcoders_in_each_format(tmp_path):
    """sae-lens, Gemma Scope 2 and sparsify transcoders: read the MLP's input, write at mlp_out."""
    w = weights()
    pre = X @ w["W_enc"] + w["b_enc"]                 # transcoders never subtract b_dec from the input
    lens = tmp_path / "lens"
    lens.mkdir()
    save_file({k: w[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}, str(lens / "sae_weights.safetensors"))
    (lens / "cfg.json").write_text(json.dumps({
        "d_in": D_IN, "d_sae": D_SAE, "d_out": D_IN, "architecture": "jumprelu_transcoder", "apply_b_dec_to_input": False,
        "metadata": {"hook_name": "blocks.2.ln2.hook_normalized", "hook_name_out": "blocks.2.hook_mlp_out"}}))
    two = tmp_path / "transcoder_all" / "layer_2_width_16k_l0_big"
    two.mkdir(parents=True)
    (two / "config.json").write_text(json.dumps({
        "architecture": "jump_relu", "hf_hook_point_in": "model.layers.2.pre_feedforward_layernorm.output",
        "hf_hook_point_out": "model.layers.2.post_feedforward_layernorm.output", "affine_connection": False}))
    save_file({k.lower() if k.startswith("W") else k: v for k, v in w.items()}, str(two / "params.safetensors"))
    for folder in (lens, two):
        tc = rg.features.load(folder)
        assert (tc.reads, tc.trained_at, tc.apply_b_dec_to_input) == ("mlp", "mlp_out[2]", False)
        torch.testing.assert_close(tc.encode(X), pre.relu() * (pre > w["threshold"]))
    sparse = tmp_path / "layers.2.mlp"
    sparse.mkdir()
    (sparse / "cfg.json").write_text(json.dumps({"activation": "topk", "num_latents": D_SAE, "k": 4, "transcode": True,
                                                 "skip_connection": False, "d_in": D_IN}))
    save_file({"encoder.weight": w["W_enc"].T.contiguous(), "encoder.bias": w["b_enc"], "W_dec": w["W_dec"],
               "b_dec": w["b_dec"]}, str(sparse / "sae.safetensors"))
    tc = rg.features.load(sparse)
    values, idx = pre.relu().topk(4, dim=-1)
    torch.testing.assert_close(tc.encode(X), torch.zeros_like(pre).scatter(-1, idx, values))
    assert (tc.reads, tc.trained_at) == ("mlp", "mlp_out[2]")
    (two / "config.json").write_text(json.dumps({
        "architecture": "jump_relu", "hf_hook_point_in": "model.layers.2.pre_feedforward_layernorm.output",
        "hf_hook_point_out": "model.layers.2.post_feedforward_layernorm.output", "affine_connection": True}))
    with pytest.raises(rg.DictionaryFileError, match="an affine transcoder"):
        rg.features.load(two)
