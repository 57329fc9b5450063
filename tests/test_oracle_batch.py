"""Batch mode (`oracle.mode: batch`): oracle stages through the Batch API of our own server, over
real HTTP with the real `openai` client. The same outputs as online at the batch price, a killed
stage re-attaches to its batch instead of submitting it again, an expired batch keeps its completed
part, and the budget counts batches in flight as committed spend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from tapir_ray.config import ConfigError, EndpointConfig, parse_config
from tapir_ray.oracle.batch import request_line, split_lines
from tapir_ray.oracle.ledger import BudgetExceeded, Ledger
from tapir_ray.oracle.local import LocalOracle
from tapir_ray.oracle.prompts import ParseError
from tapir_ray.oracle.stage import budget_left, oracle_map, read_dead_letters
from tests.conftest import REPO

pytestmark = pytest.mark.timeout(300)
PRICES = {"price_input_per_m": 2.0, "price_output_per_m": 8.0}


def rows(n: int, tag: str = "") -> list[dict]:
    out = []
    for i in range(n):
        text = f"Explain batch topic {tag}{i} in a few words."
        if i == 3:
            text += " [fault:status=422]"  # a final status: a dead letter in either mode
        if i == 5:
            text += " [unparsable]"  # a reply that does not parse: its repair does
        out.append({"id": f"r{i}", "messages": json.dumps([{"role": "user", "content": text}])})
    return out


def parse(text: str) -> str:
    if "[unparsable]" in text:
        raise ParseError("no verdict")
    return text.upper()


def endpoint(server, **batch) -> EndpointConfig:
    return EndpointConfig(base_url=server.base_url, model="local", api_key_env=None, **PRICES,
                          batch={"poll_s": 0.2, "poll_max_s": 0.5, **batch})  # fmt: skip


def stage(server, run_dir: str, data: list[dict], mode: str, ledger=None, **batch) -> list[dict]:
    return oracle_map(
        ray.data.from_items(data), role="judge", endpoint=endpoint(server, **batch), base_url=server.base_url,
        run_dir=run_dir, round_=1, params={"max_tokens": 32}, ledger=ledger or Ledger.remote(None, None),
        parse=parse, actors=1, batch_size=16, stage="round-1/judge", mode=mode,
    ).take_all()  # fmt: skip


@pytest.fixture(scope="module")
def server():
    with LocalOracle("--backend", "scripted", "--batch-seconds", "0.5") as s:
        yield s


def test_batch_mode_gives_the_online_outputs_at_the_batch_price(ray_cluster, server, tmp_path):
    data = rows(40)
    online_ledger, batch_ledger = Ledger.remote(None, None), Ledger.remote(None, None)
    before = server.stats()
    online = stage(server, str(tmp_path / "online"), data, "online", online_ledger)
    mid = server.stats()
    batched = stage(server, str(tmp_path / "batch"), data, "batch", batch_ledger)
    after = server.stats()
    key = lambda r: r["id"]  # noqa: E731
    assert [(r["id"], r["parsed"]) for r in sorted(batched, key=key)] == [
        (r["id"], r["parsed"]) for r in sorted(online, key=key)
    ]
    repaired = next(r for r in batched if r["id"] == "r5")["parsed"]
    assert len(batched) == 39 and "[UNPARSABLE]" not in repaired
    for run in ("online", "batch"):
        dead = {
            d["id"]: d["status"] for d in read_dead_letters(str(tmp_path / run), "round-1/judge")
        }
        assert dead == {"r3": "422"}
    assert mid["batches"] == before["batches"]  # online sent no batch ...
    assert after["batches"] - mid["batches"] >= 2  # ... batch mode one, and one for the repair
    assert after["requests"] == mid["requests"]  # and batch mode no online request
    on = ray.get(online_ledger.snapshot.remote())["rounds"]["1"]["judge"]
    off = ray.get(batch_ledger.snapshot.remote())["rounds"]["1"]["judge"]
    assert (
        off["prompt_tokens"] == on["prompt_tokens"]
        and off["completion_tokens"] == on["completion_tokens"]
    )
    assert off["usd"] == pytest.approx(0.5 * on["usd"]) and off["batch_usd"] == pytest.approx(
        off["usd"]
    )
    assert off["batch_saved_usd"] == pytest.approx(0.5 * on["usd"])
    assert off["batch_requests"] == 40 + 1 and on["batch_requests"] == 0  # the repair included
    # Asked again (a resume), everything answered comes from the cache: only the dead letter is
    # submitted again.
    again = stage(server, str(tmp_path / "batch"), data, "batch")
    assert sorted(r["id"] for r in again) == sorted(r["id"] for r in batched)
    last = server.stats()
    assert last["batch_lines"] - after["batch_lines"] == 1 and last["repeats"] == after["repeats"]


def test_requests_split_to_the_endpoints_limits():
    lines = [(f"k{i}", request_line(f"k{i}", "m", [{"role": "user", "content": "x" * 50}], {"max_tokens": 4,
             "extra_body": {"continue_final_message": True}})) for i in range(10)]  # fmt: skip
    assert json.loads(lines[0][1])["body"]["continue_final_message"] is True
    assert [len(f) for f in split_lines(lines, 4, 10**6)] == [4, 4, 2]
    size = len(lines[0][1]) + 1
    assert [len(f) for f in split_lines(lines, 100, 3 * size)] == [3, 3, 3, 1]


def test_an_expired_batch_keeps_its_completed_part_and_resubmits_only_the_rest(
    ray_cluster, tmp_path
):
    with LocalOracle(
        "--backend", "scripted", "--batch-seconds", "3", "--batch-window-s", "1"
    ) as slow:
        out = stage(slow, str(tmp_path), rows(200, "x")[6:], "batch", max_attempts=6)
        stats = slow.stats()
    assert len(out) == 194  # every row answered, over several batches
    assert stats["batches"] >= 2 and stats["repeats"] == 0  # nothing executed twice
    assert stats["batch_lines"] == 194


BATCH_SCRIPT = """
import json, sys, ray
from tapir_ray.config import EndpointConfig
from tapir_ray.oracle.ledger import Ledger
from tapir_ray.oracle.stage import oracle_map
url, run_dir = sys.argv[1], sys.argv[2]
ray.init(address="auto", log_to_driver=False)
rows = [{"id": f"k{i}", "messages": json.dumps([{"role": "user", "content": f"kill question {i}"}])} for i in range(120)]
ep = EndpointConfig(base_url=url, model="local", api_key_env=None, batch={"poll_s": 0.2, "poll_max_s": 0.5})
out = oracle_map(ray.data.from_items(rows), role="teacher", endpoint=ep, base_url=url, run_dir=run_dir,
                 round_=0, params={"max_tokens": 32}, ledger=Ledger.remote(None, None), actors=1,
                 batch_size=60, stage="teacher", mode="batch").take_all()
print("ROWS", len(out), flush=True)
"""


def test_a_killed_stage_reattaches_to_its_batches_instead_of_submitting_again(
    ray_cluster, tmp_path
):
    records = Path(tmp_path) / "oracle-batches"
    with LocalOracle("--backend", "scripted", "--batch-seconds", "8") as slow:
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        cmd = [sys.executable, "-c", BATCH_SCRIPT, slow.base_url, str(tmp_path)]
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 120
        while not [p for p in records.glob("*.json") if json.loads(p.read_text()).get("batch_id")]:
            assert time.monotonic() < deadline and proc.poll() is None, "no batch was recorded"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)  # the batch runs on at the provider
        proc.wait()
        submitted = slow.stats()["batches"]
        done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
        assert "ROWS 120" in done.stdout, done.stderr[-3000:]
        stats = slow.stats()
    recorded = [
        json.loads(p.read_text())
        for p in records.glob("*.json")
        if not p.name.endswith(".done.json")
    ]
    assert submitted >= 1 and stats["batch_lines"] == 120 and stats["repeats"] == 0
    # The resumed stage submitted only what had no batch yet: never a request twice.
    assert stats["batches"] == len(recorded) and sum(len(r["keys"]) for r in recorded) == 120


def test_batches_in_flight_are_committed_spend(ray_cluster, server, tmp_path):
    ledger = Ledger.remote(None, 1.0)
    assert ray.get(ledger.commit.remote("b1", 0.6)) and not ray.get(ledger.commit.remote("b2", 0.6))
    assert ray.get(ledger.headroom.remote()) == pytest.approx(0.4) and ray.get(
        ledger.allowed.remote()
    )
    ray.get(ledger.batch_progress.remote("b1", 1, "judge", None))  # collected: released
    assert ray.get(ledger.headroom.remote()) == pytest.approx(1.0)
    # A stage whose batch would cost more than the budget submits only what fits, then stops.
    data = rows(60, "budget")
    per_request = (12 * PRICES["price_input_per_m"] + 32 * PRICES["price_output_per_m"]) / 1e6 * 0.5
    budget = Ledger.remote(None, 10 * per_request)
    lines = server.stats()["batch_lines"]
    out = stage(server, str(tmp_path), data, "batch", budget)
    sent = server.stats()["batch_lines"] - lines
    assert 0 < sent <= 10 and len(out) <= sent
    with pytest.raises(BudgetExceeded):
        budget_left(budget)


def test_mode_is_set_per_role():
    cfg = parse_config(
        {"oracle": {"mode": {"default": "online", "teacher": "batch", "eval": "batch"}}}
    )
    modes = {r: cfg.oracle.mode_for(r) for r in ("teacher", "judge", "eval-judge", "refine")}
    assert modes == {
        "teacher": "batch",
        "judge": "online",
        "eval-judge": "batch",
        "refine": "online",
    }
    assert parse_config({"oracle": {"mode": "batch"}}).oracle.mode_for("judge") == "batch"
    with pytest.raises(ConfigError, match="oracle.mode"):
        parse_config({"oracle": {"mode": {"jduge": "batch"}}})
