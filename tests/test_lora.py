"""--lora-rank: only the adapters train, the KL reference is the policy with its adapters disabled (no
second copy), `lora.py merge` writes a full model whose logits equal the adapted model's, and a resumed
run equals the uninterrupted one. On the real SmolLM2-135M-Instruct where it is built, and on a tiny
Qwen2 everywhere. Skipped without peft."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from conftest import real_model

pytest.importorskip("peft")

import lora  # noqa: E402
import sampling as S  # noqa: E402
import train as T  # noqa: E402


@pytest.fixture(params=["tiny-qwen2", "smollm2-135m-instruct"])
def generator(request, built) -> str:
    return str(built["qwen2"] if request.param == "tiny-qwen2" else real_model(request.param))


def config(generator, verifier, prompts, out, **kw) -> T.Config:
    return T.Config(gen=generator, verifier=verifier, prompts=str(prompts), out=str(out), group_size=2,
                    prompts_per_step=2, micro_batch=4, max_new_tokens=6, warmup_steps=1, lr=1e-3, device="cpu",
                    sample_every=0, lora_rank=4, lora_dropout=0.1, beta=0.1, save_every=1, keep_checkpoints=3, **kw)


def test_only_the_adapters_change(generator):
    torch.manual_seed(0)
    model, tok, _, eos = S.load_generator(generator, torch.device("cpu"), dtype=None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model = lora.add_adapters(model, 4, 32.0, 0.0, "all-linear")
    cfg = T.Config(group_size=2, max_new_tokens=6, micro_batch=4, lora_rank=4)
    rollout = T.generate(model, tok, ["Say hello.", "Count to three."], cfg, eos, torch.device("cpu"))
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-2)
    T.policy_update(model, None, opt, None, rollout, torch.randn(rollout.response.shape) * rollout.mask, cfg,
                    torch.device("cpu"))
    after = dict(model.named_parameters())
    adapters = {k for k in after if "lora_" in k}
    assert adapters and {k for k, p in after.items() if p.requires_grad} == adapters
    assert all(not torch.equal(after[k], torch.zeros_like(after[k])) for k in adapters if "lora_B" in k)
    for name, p in after.items():  # base weights: the pretrained ones, bit for bit
        if name not in adapters:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, before[key]), name


def test_reference_without_a_second_copy_merge_and_exact_resume(generator, built, four_prompts, tmp_path,
                                                               monkeypatch):
    loads, real_load = [], S.load_causal_lm

    def spy(name, dtype=None, **kw):
        loads.append(str(name))
        return real_load(name, dtype=dtype, **kw)
    monkeypatch.setattr(S, "load_causal_lm", spy)
    cfg = config(generator, str(built["gemma3"]), four_prompts, tmp_path / "full", max_steps=2)
    history = T.train(cfg)
    assert loads.count(generator) == 1                       # the reference is the policy, adapters off
    assert history[0]["kl"] == 0.0 and history[1]["kl"] > 0  # equal until the adapters move
    final = tmp_path / "full" / "checkpoint-2"
    assert lora.is_adapter(final) and not list(final.glob("model*.safetensors"))

    # resume: one step, then the second from its checkpoint, equals the two steps in one go
    part = tmp_path / "part"
    T.train(replace(cfg, out=str(part), max_steps=1))
    T.train(replace(cfg, out=str(part), max_steps=2, resume=True))
    from safetensors.torch import load_file
    a, b = load_file(final / "adapter_model.safetensors"), load_file(part / "checkpoint-2" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (tmp_path / "full", part)]
    assert [m["reward_mean"] for m in lines[0]] == [m["reward_mean"] for m in lines[1]]

    # merge: a full model, loaded as users load one, computes what base + adapter computes
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert lora.main(["merge", str(final), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(generator, dtype=torch.float32), str(final))
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted.eval()(ids).logits, rtol=1e-4, atol=1e-4)


def test_bad_lora_settings_are_one_line(capsys, tmp_path, monkeypatch):
    assert T.main(["--lora-rank", "4", "--rollout-dtype", "bf16", "--out", str(tmp_path / "a")]) == 2
    assert "--rollout-dtype bf16 copies the whole policy" in capsys.readouterr().err
    assert T.main(["--lora-rank", "4", "--lora-dropout", "1", "--out", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err.strip() == "error: --lora-dropout 1.0: must lie in [0, 1)"
    monkeypatch.setitem(__import__("sys").modules, "peft", None)  # peft not installed
    assert T.main(["--lora-rank", "4", "--out", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err.strip() == "error: --lora-rank needs the peft package: pip install peft"
    assert lora.main(["merge", str(tmp_path), str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.strip() == "error: --lora-rank needs the peft package: pip install peft"
    monkeypatch.delitem(__import__("sys").modules, "peft")  # installed again
    assert lora.main(["merge", str(tmp_path / "gone"), str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'gone'}: no such checkpoint folder"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{")
    assert lora.main(["merge", str(tmp_path / "bad"), str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: {tmp_path / 'bad' / 'adapter_config.json'} is corrupt")


def test_num_iterations_first_update_sees_the_network_pi_old_saw(built):
    """--num-iterations 2 with LoRA dropout: log pi_old is computed without dropout, so the update must
    run without it too; the first update's ratio is then exactly 1 and nothing clips."""
    torch.manual_seed(0)
    model, tok, _, eos = S.load_generator(str(built["qwen2"]), torch.device("cpu"), dtype=None)
    model = lora.add_adapters(model, 8, 32.0, 0.3, "all-linear")
    with torch.no_grad():  # trained adapters: lora_B away from its zero start, so dropout changes the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    cfg = T.Config(group_size=4, max_new_tokens=8, micro_batch=4, lora_rank=8, lora_dropout=0.3, num_iterations=2)
    rollout = T.generate(model, tok, ["Say hello.", "Count to three."], cfg, eos, torch.device("cpu"))
    old = T.old_logprobs(model, rollout, cfg, torch.device("cpu"))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    first = T.policy_update(model, None, opt, None, rollout, torch.randn(rollout.response.shape) * rollout.mask, cfg,
                            torch.device("cpu"), old_logp=old)
    assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and first["clip_frac"] == 0.0
