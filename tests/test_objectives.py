"""objectives.py: the rewards a run can maximise, and adding one as docs/rewards.md says.

The rewards themselves are tested where they are used (test_train.py: Eq. 1, Eq. 3, RENT and rkl
against oracles, through train.score); here, the registry and the docs' example."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import objectives
import sampling as S
import train as T
from conftest import ROOT
from config import check_config, parse_config


def docs_example() -> str:
    text = (ROOT / "docs" / "rewards.md").read_text()
    return re.search(r"## Adding a reward.*?```python\n(.*?)```", text, re.S).group(1)


@pytest.fixture
def finished():
    """The docs' example, run as written inside objectives.py's namespace; taken out afterwards."""
    exec(docs_example(), vars(objectives))
    yield objectives.REWARDS["finished"]
    objectives.REWARDS.pop("finished")
    del objectives.finished


def test_the_docs_example_is_about_ten_lines_and_train_py_takes_it(built, finished):
    from reward import Verifier, load_causal_lm

    assert sum(1 for line in docs_example().splitlines() if line.strip()) <= 10
    cfg = parse_config(["--reward", "finished", "--group-size", "2"])
    check_config(cfg)
    _, tok, _, _ = S.load_generator(str(built["qwen2"]), torch.device("cpu"))
    verifier = Verifier(*load_causal_lm(str(built["gemma3"]), device="cpu"))
    texts, truncated = ["Hello there.", "Hi", "Three cats.", "One, two"], torch.tensor([False, True, False, True])
    ids = [tok(t).input_ids for t in texts]
    width = max(map(len, ids))
    rollout = S.Rollout(["Say hi"] * 2 + ["Count"] * 2, [[0]] * 4,
                        torch.tensor([x + [0] * (width - len(x)) for x in ids]),
                        torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]).bool(), truncated, texts)
    adv, per_response, cme, _ = T.score(rollout, cfg, verifier, tok, None, torch.device("cpu"))
    eq3 = verifier.sequence_cme(rollout.prompts, texts)
    np.testing.assert_allclose(per_response, -eq3 + (~truncated).double().numpy())
    np.testing.assert_allclose(cme, eq3)
    assert adv.shape == (4,) and (adv[[0, 2]] > adv[[1, 3]]).all()  # the bonus outweighs the CME gaps here


def test_a_reward_not_in_rewards_is_one_line(built):
    with pytest.raises(SystemExit):
        parse_config(["--reward", "finished"])
    from dataclasses import replace

    with pytest.raises(ValueError, match="--reward 'finished': choose from token, sequence, rent, rkl"):
        check_config(replace(T.Config(), reward="finished"))


def test_each_reward_lives_in_objectives_alone():
    """Adding rkl touched one function in one place: the training loop and the settings name no reward
    but rent (which loads no verifier), and every function of REWARDS is in objectives.py."""
    for name in ("train.py", "config.py"):
        code = (ROOT / name).read_text()
        assert set(re.findall(r"reward\s*(?:==|!=|in)\s*\(?[\"'](\w+)", code)) <= {"rent"}, name
    assert all(fn.__module__ == "objectives" for fn in objectives.REWARDS.values())
    assert all(fn.__doc__ and fn.__doc__.splitlines()[0].endswith(".") for fn in objectives.REWARDS.values())
