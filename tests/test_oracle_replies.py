"""Every reply class real providers send ends as an Answer or a DeadLetter, and a reply that was
received is never asked for again: each case is called twice against one cache, as a resume would.

The scripted server makes each class on request, by a `[fault:...]` marker in the message."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import ray

from tapir_ray.config import ConfigError, EndpointConfig, parse_config
from tapir_ray.oracle import prompts as P
from tapir_ray.oracle.cache import ResponseCache
from tapir_ray.oracle.client import Answer, DeadLetter, OracleClient
from tapir_ray.oracle.ledger import Ledger
from tapir_ray.oracle.limiter import limiter_for
from tapir_ray.oracle.local import LocalOracle
from tapir_ray.oracle.stage import oracle_map, read_dead_letters

pytestmark = pytest.mark.timeout(300)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def server():
    with LocalOracle("--backend", "scripted") as s:
        yield s


def _client(server, cache_dir, **ep) -> OracleClient:
    endpoint = EndpointConfig(
        base_url=server.base_url, model="local", api_key_env=ep.pop("api_key_env", None), **ep
    )
    limiter = limiter_for(f"{server.base_url}|replies", 60_000, 10**9)
    client = OracleClient(
        endpoint, server.base_url, limiter=limiter, cache=ResponseCache(str(cache_dir))
    )
    client.test_loop = asyncio.new_event_loop()  # its HTTP connections belong to one loop
    return client


def _ask(client, text: str, parse=None, params=None):
    msgs = [{"role": "user", "content": text}]
    return client.test_loop.run_until_complete(
        client.call("row", "teacher", msgs, params or {"max_tokens": 32}, parse)
    )


def _attempts(server) -> int:
    return server.stats()["requests"]


@pytest.mark.parametrize("code", [400, 401, 402, 403, 404, 409, 413, 422])
def test_final_statuses_dead_letter_at_once_and_never_carry_the_key(
    ray_cluster, server, tmp_path, monkeypatch, code
):
    monkeypatch.setenv("TEST_ORACLE_KEY", "sk-test-SECRETSECRETSECRET")
    # 409 is retryable: it retries until the request's deadline, then dead-letters.
    client = _client(server, tmp_path, api_key_env="TEST_ORACLE_KEY", retry_deadline_s=1.5)
    before = _attempts(server)
    out = _ask(client, f"Tell me a fact. [fault:status={code}]")
    assert isinstance(out, DeadLetter) and out.status == str(code)
    sent = _attempts(server) - before
    assert sent > 1 if code == 409 else sent == 1
    assert "SECRET" not in out.reason and "sk-test" not in out.reason
    if code == 401:
        assert "[redacted]" in out.reason  # the server echoed the bearer value; it is gone


def test_retryable_failures_ride_out_an_outage_within_the_deadline(ray_cluster, server, tmp_path):
    client = _client(server, tmp_path, retry_deadline_s=60)
    out = _ask(client, "Name a river. [fault:fail_times=3]")
    assert isinstance(out, Answer) and client.delta.counts["retries"] == 3
    # A server-wide outage of 4 s: the request keeps retrying and is answered when it ends.
    urllib.request.urlopen(
        urllib.request.Request(f"{server.base_url[:-3]}/outage?seconds=4", method="POST")
    ).close()
    started = time.monotonic()
    out = _ask(client, "Name a mountain.")
    assert isinstance(out, Answer) and time.monotonic() - started >= 3.5
    # With a deadline shorter than the outage the row becomes a dead letter, not an exception.
    urllib.request.urlopen(
        urllib.request.Request(f"{server.base_url[:-3]}/outage?seconds=4", method="POST")
    ).close()
    short = _client(server, tmp_path, retry_deadline_s=1.0)
    out = _ask(short, "Name a lake.")
    assert isinstance(out, DeadLetter) and out.status == "503" and "gave up" in out.reason
    time.sleep(4)


def test_a_hung_request_times_out_and_a_dropped_connection_is_retried(
    ray_cluster, server, tmp_path
):
    client = _client(server, tmp_path, timeout_s=1.0, retry_deadline_s=60)
    out = _ask(client, "Name a valley. [fault:hang_times=1]")
    assert isinstance(out, Answer) and client.delta.counts["retries"] == 1
    out = _ask(client, "Name a canyon. [fault:drop_times=2]")
    assert isinstance(out, Answer) and client.delta.counts["retries"] == 3
    # A server that never answers: retried until the deadline, then a dead letter that says so.
    short = _client(server, tmp_path, timeout_s=0.5, retry_deadline_s=2.0)
    out = _ask(short, "Name a glacier. [fault:hang_times=99]")
    assert isinstance(out, DeadLetter) and out.status == "timeout" and "gave up" in out.reason
    short.test_loop.run_until_complete(short.aclose())
    client.test_loop.run_until_complete(client.aclose())


def test_an_oracle_actor_starts_without_the_openai_library():
    """Its import takes ~0.7 s of CPU in every oracle actor of every stage; only batch mode, which
    calls the provider's files and batches endpoints through it, loads it."""
    code = "import sys, tapir_ray.oracle.stage; print('openai' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_a_long_retry_after_is_capped_and_logged(ray_cluster, server, tmp_path, caplog):
    client = _client(server, tmp_path, max_retry_after_s=0.5)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="tapir_ray.oracle.client"):
        out = _ask(client, "Name a sea. [fault:retry_after=3600]")
    assert isinstance(out, Answer) and time.monotonic() - started < 10
    assert any(
        "3600" in r.getMessage() and "max_retry_after_s" in r.getMessage() for r in caplog.records
    )


@pytest.mark.parametrize("fault", ["empty_choices", "no_message"])
def test_a_200_that_is_not_a_completion_is_a_dead_letter(ray_cluster, server, tmp_path, fault):
    client = _client(server, tmp_path)
    before = _attempts(server)
    out = _ask(client, f"Name a star. [fault:{fault}]")
    assert isinstance(out, DeadLetter) and out.status == "malformed"
    assert _attempts(server) - before == 3  # asked again twice, then given up: never a loop


def test_a_reply_without_usage_is_estimated_cached_and_never_paid_twice(
    ray_cluster, server, tmp_path
):
    price = {"price_input_per_m": 1e6, "price_output_per_m": 1e6}  # one USD a token
    client = _client(server, tmp_path, **price)
    before = server.stats()["ok"]
    out = _ask(client, "Name a planet. [fault:null_usage]")
    assert (
        isinstance(out, Answer)
        and out.usage["prompt_tokens"] > 0
        and out.usage["completion_tokens"] > 0
    )
    assert client.delta.counts["usd"] == out.usage["prompt_tokens"] + out.usage["completion_tokens"]
    again = _client(server, tmp_path, **price)  # a resumed run
    assert isinstance(_ask(again, "Name a planet. [fault:null_usage]"), Answer)
    assert server.stats()["ok"] == before + 1 and again.delta.counts["usd"] == 0


def test_a_refusal_is_billed_once_cached_and_dead_lettered(ray_cluster, server, tmp_path):
    price = {"price_input_per_m": 1e6, "price_output_per_m": 0.0}
    client = _client(server, tmp_path, **price)
    before = server.stats()["ok"]
    out = _ask(client, "Something the filter refuses. [fault:refusal]")
    assert isinstance(out, DeadLetter) and out.status == "content_filter"
    assert client.delta.counts["usd"] > 0
    again = _client(server, tmp_path, **price)
    out2 = _ask(again, "Something the filter refuses. [fault:refusal]")
    assert isinstance(out2, DeadLetter) and out2.status == "content_filter"
    assert server.stats()["ok"] == before + 1 and again.delta.counts["usd"] == 0


def test_a_reply_is_cached_even_when_the_ledger_is_gone(ray_cluster, server, tmp_path):
    """A killed driver takes its ledger with it while an oracle actor may still be receiving
    replies: those replies were paid, so they reach the cache although the budget report fails."""
    client = _client(server, tmp_path)

    async def ledger_gone():
        raise ray.exceptions.RayActorError()

    client.on_paid = ledger_gone
    before = server.stats()["ok"]
    with pytest.raises(ray.exceptions.RayActorError):
        _ask(client, "Name a river.")
    again = _client(server, tmp_path)  # the resumed run
    assert isinstance(_ask(again, "Name a river."), Answer)
    assert server.stats()["ok"] == before + 1 and again.delta.counts["cache_hits"] == 1


def test_filler_log_probabilities_are_a_parse_failure_not_a_crash(ray_cluster, server, tmp_path):
    """OpenAI fills top_logprobs with −9999 where it has nothing: no mass, so no score."""

    def g_eval(text, logprobs=None):
        P.parse_rating(text)
        return P.logprob_score(logprobs)

    client = _client(server, tmp_path)
    prompt = P.judge_single("Say hi. [fault:filler_logprobs]", "Hello!")
    params = {"max_tokens": 64, "logprobs": True, "top_logprobs": 5}
    out = client.test_loop.run_until_complete(
        client.call("j", "judge", prompt.messages, params, g_eval)
    )
    assert isinstance(out, DeadLetter) and out.status == "unparsable"
    plain = client.test_loop.run_until_complete(
        client.call("k", "judge", P.judge_single("Say hi.", "Hello!").messages, params, g_eval)
    )
    assert isinstance(plain, Answer) and 1 <= plain.parsed <= 10


def test_a_stage_writes_its_dead_letters_under_its_own_name(ray_cluster, server, tmp_path):
    rows = [{"id": f"q{i}", "messages": json.dumps([{"role": "user", "content": f"q{i}" + (" [fault:status=422]" if i % 2 else "")}])}
            for i in range(6)]  # fmt: skip
    endpoint = EndpointConfig(base_url=server.base_url, model="local", api_key_env=None)
    out = oracle_map(
        ray.data.from_items(rows), role="teacher", endpoint=endpoint, base_url=server.base_url,
        run_dir=str(tmp_path), round_=1, params={"max_tokens": 16}, ledger=Ledger.remote(None, None),
        actors=1, batch_size=2, stage="round-1/refine",
    ).take_all()  # fmt: skip
    assert sorted(r["id"] for r in out) == ["q0", "q2", "q4"]
    dead = read_dead_letters(str(tmp_path), "round-1/refine")
    assert sorted(d["id"] for d in dead) == ["q1", "q3", "q5"] and {d["status"] for d in dead} == {
        "422"
    }
    assert read_dead_letters(str(tmp_path), "round-1/judge") == []


def test_a_slow_reply_does_not_hold_back_the_next_batch_of_its_task(ray_cluster, server, tmp_path):
    """One Ray Data task takes 8 rows as two batches of 4. The first row's reply comes only once 7
    more requests have reached the server (else a final 422 after 30 s): the second batch has to
    be sent while the first still waits for its slowest reply."""
    rows = [{"id": f"w{i}", "messages": json.dumps([{"role": "user", "content": f"window {i}" + (" [fault:wait_for=7]" if i == 0 else "")}])}
            for i in range(8)]  # fmt: skip
    endpoint = EndpointConfig(base_url=server.base_url, model="local", api_key_env=None)
    out = oracle_map(
        ray.data.from_items(rows, override_num_blocks=1), role="teacher", endpoint=endpoint,
        base_url=server.base_url, run_dir=str(tmp_path), round_=1, params={"max_tokens": 16},
        ledger=Ledger.remote(None, None), actors=1, batch_size=4, stage="round-1/window",
    ).take_all()  # fmt: skip
    assert read_dead_letters(str(tmp_path), "round-1/window") == []
    assert sorted(r["id"] for r in out) == [f"w{i}" for i in range(8)]


def test_too_many_dead_letters_fail_the_stage_and_a_rerun_asks_only_those_again(
    ray_cluster, server, tmp_path
):
    """Half the rows fail for longer than their deadline: the stage fails in one line; once the
    cause is gone, the rerun asks the dead-lettered rows again and the answered ones not at all."""
    from tapir_ray.oracle.stage import TooManyDeadLetters, check_dead_share, clear_dead_letters

    rows = [{"id": f"d{i}", "messages": json.dumps([{"role": "user", "content": f"outage question {i}" + (" [fault:fail_times=3]" if i % 2 else "")}])}
            for i in range(8)]  # fmt: skip
    endpoint = EndpointConfig(
        base_url=server.base_url, model="local", api_key_env=None, retry_deadline_s=0.3
    )

    def stage() -> list[dict]:
        clear_dead_letters(str(tmp_path), "round-1/judge")
        return oracle_map(
            ray.data.from_items(rows), role="judge", endpoint=endpoint, base_url=server.base_url,
            run_dir=str(tmp_path), round_=1, params={"max_tokens": 16}, ledger=Ledger.remote(None, None),
            actors=1, batch_size=4, stage="round-1/judge",
        ).take_all()  # fmt: skip

    out = stage()
    assert len(out) == 4
    with pytest.raises(TooManyDeadLetters) as info:
        check_dead_share(str(tmp_path), "round-1/judge", 8, len(out), 0.05)
    message = str(info.value)
    assert "\n" not in message and "round-1/judge: 4 of 8 rows" in message and "503" in message
    check_dead_share(str(tmp_path), "round-1/judge", 8, len(out), 0.5)  # within a looser share
    ok_before = server.stats()["ok"]
    endpoint = endpoint.model_copy(update={"retry_deadline_s": 30.0})  # the outage is over
    again = stage()
    assert sorted(r["id"] for r in again) == [f"d{i}" for i in range(8)]
    assert server.stats()["ok"] == ok_before + 4  # only the dead-lettered four were asked again
    assert read_dead_letters(str(tmp_path), "round-1/judge") == []


def test_doctor_checks_that_every_node_has_the_key(ray_cluster, monkeypatch):
    """Oracle actors run on worker nodes: a key set only where the driver runs is reported."""
    from tapir_ray.doctor import FAIL, OK, check_keys_on_nodes

    monkeypatch.setenv(
        "ONLY_ON_THE_DRIVER_KEY", "sk-driver-only-value"
    )  # after the cluster started
    cfg = parse_config({"oracle": {
        "teacher": {"base_url": "https://teacher.example/v1", "api_key_env": "ONLY_ON_THE_DRIVER_KEY"},
        "judge": {"base_url": "https://judge.example/v1", "api_key_env": "PATH"},
    }})  # fmt: skip
    rows = {name: (status, detail) for name, status, detail in check_keys_on_nodes(cfg)}
    assert rows["$ONLY_ON_THE_DRIVER_KEY on nodes"][0] == FAIL
    assert rows["$PATH on nodes"][0] == OK
    assert all("sk-driver" not in detail for _, detail in rows.values())


def test_a_key_is_never_sent_in_clear_to_another_host():
    with pytest.raises(ValueError, match="in clear"):
        EndpointConfig(base_url="http://10.0.0.5:8000/v1", api_key_env="OPENAI_API_KEY")
    EndpointConfig(base_url="http://10.0.0.5:8000/v1", api_key_env=None)  # no key: fine
    EndpointConfig(
        base_url="http://127.0.0.1:8000/v1", api_key_env="OPENAI_API_KEY"
    )  # this machine
    EndpointConfig(base_url="http://10.0.0.5:8000/v1", api_key_env="K", allow_key_over_http=True)
    with pytest.raises(ConfigError, match="oracle.teacher"):
        parse_config({"oracle": {"teacher": {"base_url": "http://vllm.internal:8000/v1"}}})


def test_a_proxy_from_the_environment_carries_the_requests(
    ray_cluster, server, tmp_path, monkeypatch
):
    """HTTP_PROXY is honoured as the openai library honours it, read once when the client's
    session is made. The scripted server stands in for the proxy: the endpoint's own host does not
    resolve, so only the proxy can have answered. A host NO_PROXY names goes direct."""
    from tapir_ray.oracle.client import _env_proxy

    for name in ("HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", server.base_url.rsplit("/v1", 1)[0])
    url = "http://oracle.invalid/v1"
    endpoint = EndpointConfig(base_url=url, model="local", api_key_env=None, retry_deadline_s=5.0)
    client = OracleClient(endpoint, url, limiter=limiter_for(f"{url}|proxy", 60_000, 10**9),
                          cache=ResponseCache(str(tmp_path / "cache")))  # fmt: skip
    client.test_loop = asyncio.new_event_loop()
    before = _attempts(server)
    assert isinstance(_ask(client, "through the proxy"), Answer)
    assert _attempts(server) == before + 1
    monkeypatch.setenv("NO_PROXY", "oracle.invalid")
    assert _env_proxy(url + "/chat/completions") == (None, None)


# --- budget across kills, and one driver per run -----------------------------------------------------

BUDGET_SCRIPT = """
import json, sys, ray
from tapir_ray.config import EndpointConfig
from tapir_ray.oracle.ledger import BudgetExceeded, Ledger
from tapir_ray.oracle.stage import budget_left, oracle_map
url, run_dir = sys.argv[1], sys.argv[2]
ray.init(address="auto", log_to_driver=False)
rows = [{"id": f"r{i}", "messages": json.dumps([{"role": "user", "content": f"budget question {i}"}])} for i in range(200)]
ep = EndpointConfig(base_url=url, model="local", api_key_env=None, max_concurrency=2,
                    price_input_per_m=0.0, price_output_per_m=1e6 / 40)  # ~1 USD a reply
ledger = Ledger.remote(run_dir + "/ledger.json", 30.0, cache_root=run_dir + "/oracle-cache")
oracle_map(ray.data.from_items(rows), role="teacher", endpoint=ep, base_url=url, run_dir=run_dir,
           round_=1, params={"max_tokens": 64}, ledger=ledger, actors=1, batch_size=4).count()
try:
    budget_left(ledger)
except BudgetExceeded as exc:
    print("STOPPED", "max_usd" in str(exc), flush=True)
ray.get(ledger.flush.remote())
"""


def test_total_spend_stays_within_the_budget_across_kills_and_resumes(ray_cluster, tmp_path):
    with LocalOracle("--backend", "scripted", "--latency-ms", "100-200") as server:
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        cmd = [sys.executable, "-c", BUDGET_SCRIPT, server.base_url, str(tmp_path)]
        for _ in range(1):  # killed after a few paid replies
            proc = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            seen = server.stats()["ok"]
            deadline = time.monotonic() + 120
            while server.stats()["ok"] < seen + 8 and time.monotonic() < deadline:
                time.sleep(0.1)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for _ in range(2):  # then resumed to the end, twice: each stops at the budget
            done = subprocess.run(
                cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240
            )
            assert "STOPPED True" in done.stdout, done.stderr[-2000:]
        stats = server.stats()
    costs = [float(e["usd"]) for _, e in ResponseCache(str(tmp_path / "oracle-cache")).entries()]
    paid, per_reply = sum(costs), sum(costs) / len(costs)
    assert paid >= 30  # the budget was reached
    # What the server answered, over a kill and two resumes: the budget plus the requests in
    # flight when it was reached and at the kill (one actor, max_concurrency 2: 2 each).
    seen = f"server {stats}, {len(costs)} replies cached"
    assert stats["ok"] * per_reply <= 30 + (2 + 2 + 1) * per_reply, seen
    assert stats["repeats"] <= 2, seen  # asked again: only replies in flight at the kill
    ledger = json.loads((tmp_path / "ledger.json").read_text())
    assert ledger["spent_usd"] == pytest.approx(paid, rel=0.02)


def test_a_second_driver_is_refused_and_a_dead_drivers_lease_is_taken_over(tmp_path):
    from tapir_ray.lease import LeaseHeld, RunLease

    code = ("import sys, time\nfrom tapir_ray.lease import RunLease\n"
            "RunLease(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(600)")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld, match=f"pid {holder.pid}"):
            RunLease(str(tmp_path)).acquire()
    finally:
        holder.kill()
        holder.wait()
    with RunLease(str(tmp_path)) as lease:  # its driver is gone: taken over
        assert lease.holder()["pid"] == os.getpid()
        with pytest.raises(LeaseHeld):
            RunLease(str(tmp_path)).acquire()
    assert not (tmp_path / "lease.json").exists()
