"""The web pages of `kvloom serve` (chat at /, dashboard at /dashboard) in a real headless Chromium.

Needs Debian's chromium at /usr/bin/chromium and Playwright for Python: scripts/install-browser.sh
(run by `make install-test`). KVLOOM_SCREENSHOTS=1 also writes docs/img/web_chat.png and
docs/img/web_dashboard.png; screenshots always go to the test's tmp dir.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from server_harness import ServerThread, slowed, tiny_engine

CHROMIUM = "/usr/bin/chromium"
DOCS_IMG = Path(__file__).resolve().parent.parent / "docs" / "img"

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    engine = slowed(tiny_engine(tiny_model_dir("llama"), max_num_seqs=8), 0.03)
    with ServerThread(engine) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    """Only the browser tests need Playwright and chromium; the others run without. `make test` installs both
    (scripts/install-browser.sh), so under CI a missing browser is a failure, not a skip."""
    missing = pytest.fail if os.environ.get("CI") else pytest.skip
    try:
        from playwright import sync_api
    except ImportError:
        missing("no Playwright: run scripts/install-browser.sh")
    if not os.path.exists(CHROMIUM):
        missing("no /usr/bin/chromium: run scripts/install-browser.sh")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1360, "height": 860})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    yield pg
    ctx.close()
    assert not [e for e in errors if "401" not in e], errors  # a 401 is logged by the browser, and expected


def _long_answers(page):
    """The tiny random model may pick EOS at any point: ask the server to ignore it."""
    def handle(route):
        body = json.loads(route.request.post_data)
        route.continue_(post_data=json.dumps({**body, "ignore_eos": True}))
    page.route("**/v1/chat/completions", handle)


def _screenshot(page, tmp_path, name):
    path = tmp_path / name
    page.screenshot(path=str(path))
    if os.environ.get("KVLOOM_SCREENSHOTS") == "1":
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, DOCS_IMG / name)


def _running(server) -> float:
    text = httpx.get(server.url + "/metrics").text
    return float(re.search(r"^kvloom_num_requests_running (\S+)$", text, re.M).group(1))


def _answer_text(page) -> str:
    return page.locator(".msg.assistant .bubble").last.inner_text()


def _wait_idle(server, timeout=20):
    deadline = time.time() + timeout
    while _running(server) != 0:
        assert time.time() < deadline, "requests still running"
        time.sleep(0.1)


def test_pages_load_and_assets_are_packaged(server):
    for path, kind in [("/", "text/html"), ("/dashboard", "text/html"), ("/static/chat.js", "text/javascript"),
                       ("/static/kvloom.css", "text/css")]:
        r = httpx.get(server.url + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), path
        assert "default-src 'self'" in r.headers["content-security-policy"]
    assert httpx.get(server.url + "/static/..%2Fweb.py").status_code == 404
    assert httpx.get(server.url + "/static/nope.js").status_code == 404
    stats = httpx.get(server.url + "/dashboard/stats").json()
    inst = stats["instances"][0]
    assert inst["model"] == "tiny" and "latency" in inst and "generation_tokens_total" in inst


def test_metrics_have_vllm_names_and_counters(server):
    r = httpx.post(server.url + "/v1/completions",
                   json={"model": "tiny", "prompt": "hello", "max_tokens": 5, "ignore_eos": True})
    assert r.status_code == 200
    text = httpx.get(server.url + "/metrics").text
    for name in ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"]:
        assert f"# TYPE {name} gauge" in text and f'{name}{{model_name="tiny"}}' in text
    for name in ["vllm:prompt_tokens", "vllm:generation_tokens", "vllm:num_preemptions",
                 "vllm:prefix_cache_queries", "vllm:prefix_cache_hits",
                 "kvloom_num_preemptions", "kvloom_prefix_cache_queries", "kvloom_prefix_cache_hits"]:
        assert re.search(rf"^# TYPE {name}(_total)? counter$", text, re.M) and f"{name}_total" in text, name
    for name in ["vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds"]:
        assert f"# TYPE {name} histogram" in text and f'{name}_count{{model_name="tiny"}}' in text, name
    gen = float(re.search(r'^vllm:generation_tokens_total\{model_name="tiny"\} (\S+)$', text, re.M).group(1))
    assert gen == float(re.search(r"^kvloom_generation_tokens_total (\S+)$", text, re.M).group(1)) >= 5


def test_engine_totals_become_counters():
    """Preemptions and prefix-cache totals of the engine feed Counters by their increase, both names."""
    from types import SimpleNamespace as NS

    from kvloom.server.metrics import ServerMetrics

    m = ServerMetrics("m")

    class Sessions(list):
        num_blocks_held = 0

    sched = NS(running=[1], waiting=[], num_preemptions=0)
    engine = NS(scheduler=sched, pool=NS(num_used=1, num_blocks=4), sessions=Sessions(), prefix_cache=None,
                speculator=None)
    for preempt, queries, hits in [(0, 0, 0), (2, 32, 16), (2, 32, 16), (5, 64, 48)]:
        sched.num_preemptions = preempt
        engine.prefix_cache = NS(queries=queries, hits=hits, hit_rate=hits / queries if queries else 0.0)
        m.observe_engine(engine, [])
    text = m.render().decode()
    assert "kvloom_num_preemptions_total 5.0" in text and 'vllm:num_preemptions_total{model_name="m"} 5.0' in text
    assert "kvloom_prefix_cache_queries_total 64.0" in text and "kvloom_prefix_cache_hits_total 48.0" in text
    assert 'vllm:prefix_cache_hits_total{model_name="m"} 48.0' in text
    assert 'vllm:kv_cache_usage_perc{model_name="m"} 0.25' in text
    snap = m.snapshot()
    assert snap["preemptions_total"] == 5 and snap["running"] == 1 and snap["kv_cache_usage"] == 0.25


def test_chat_streams_renders_and_survives_reload(server, page, tmp_path):
    _long_answers(page)
    page.goto(server.url + "/")
    page.wait_for_function("() => document.querySelector('#model').value === 'tiny'")
    page.fill("#max_tokens", "60")
    page.fill("#seed", "7")
    page.fill("#system", "You are terse.")
    page.fill("#prompt", "Tell me about **loops** in `python`")
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelector('.msg.assistant .bubble')?.innerText.length > 0")
    first = len(_answer_text(page))
    page.wait_for_function(f"() => document.querySelector('.msg.assistant .bubble').innerText.length > {first + 5}")
    assert page.is_visible("#stop")
    page.wait_for_selector("body[data-streaming='0']", timeout=30_000)
    figures = page.locator(".msg.assistant .figures").inner_text()
    assert "TTFT" in figures and "tok/s" in figures and "60 tokens" in figures and "prompt tokens cached" in figures
    # The user's Markdown is shown as typed (not rendered); the answer is rendered.
    assert page.locator(".msg.user .bubble").inner_text() == "Tell me about **loops** in `python`"
    answer = _answer_text(page)
    _screenshot(page, tmp_path, "web_chat.png")

    # Regenerate: same seed, same settings: the same answer again, once.
    page.click(".msg.assistant .regenerate")
    page.wait_for_selector("body[data-streaming='1']")
    page.wait_for_selector("body[data-streaming='0']", timeout=30_000)
    assert page.locator(".msg.assistant").count() == 1
    assert _answer_text(page) == answer
    cached = page.locator(".msg.assistant .figures .cached").inner_text()   # the prompt's KV was reused
    assert int(re.match(r"(\d+)/\d+ prompt tokens cached", cached).group(1)) > 0, cached

    page.reload()
    page.wait_for_selector(".msg.assistant .bubble")
    assert _answer_text(page) == answer
    assert page.locator(".conv-list li.active .title").inner_text().startswith("Tell me about")

    # Edit the question and resend: the old answer is replaced by a new one.
    page.click(".msg.user .edit")
    page.fill(".msg.user textarea.edit", "Another question")
    page.click(".msg.user .save-edit")
    page.wait_for_selector("body[data-streaming='0']", timeout=30_000)
    assert page.locator(".msg.user .bubble").inner_text() == "Another question"
    assert page.locator(".msg.assistant").count() == 1


def test_stop_aborts_the_engine_request(server, page):
    _long_answers(page)
    page.goto(server.url + "/")
    page.wait_for_function("() => document.querySelector('#model').value === 'tiny'")
    page.fill("#max_tokens", "180")
    page.fill("#prompt", "write a long story")
    page.click("#send")
    page.wait_for_function("() => document.querySelector('.msg.assistant .bubble')?.innerText.length > 10")
    assert _running(server) == 1
    page.click("#stop")
    page.wait_for_selector("body[data-streaming='0']")
    assert "stopped" in page.locator(".msg.assistant .figures").inner_text()
    _wait_idle(server, timeout=10)  # the server saw the disconnect and aborted the engine request
    stopped_text = _answer_text(page)
    page.reload()
    page.wait_for_selector(".msg.assistant .bubble")
    assert _answer_text(page) == stopped_text


def test_markdown_is_rendered_safely(server, page):
    page.goto(server.url + "/")
    html = page.evaluate("""async () => {
        const { renderMarkdown } = await import('/static/markdown.js');
        return renderMarkdown('# Title\\n<img src=x onerror=alert(1)> **bold** [x](javascript:alert(1)) '
                              + '[ok](https://example.com)\\n\\n- a\\n- b\\n\\n```py\\nprint("<b>")\\n```');
    }""")
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html and "<ul><li>a</li><li>b</li></ul>" in html
    assert 'href="javascript' not in html and '<a href="https://example.com"' in html
    assert '<code class="lang-py">print(&quot;&lt;b&gt;&quot;)</code>' in html


def test_dashboard_updates_under_load(server, page, tmp_path):
    _wait_idle(server)
    page.goto(server.url + "/dashboard")
    page.wait_for_selector("[data-group='Engine, scheduler and kernels'] td")
    assert "tiny" in page.locator("[data-group='Model']").inner_text()
    generated = page.locator(".tile[data-k='tok_s'] .sub")
    page.wait_for_function("() => document.querySelector(\".tile[data-k='tok_s'] .sub\")"
                           ".innerText.includes('generated')")
    before = generated.inner_text()

    stop = threading.Event()

    def load(i):
        while not stop.is_set():
            httpx.post(server.url + "/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": f"load {i} " * (i + 1), "max_tokens": 40, "ignore_eos": True})

    threads = [threading.Thread(target=load, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        page.wait_for_function("() => Number(document.querySelector(\".tile[data-k='running'] .value\").innerText) > 0",
                               timeout=20_000)
        page.wait_for_function("() => Number(document.querySelector(\".tile[data-k='tok_s'] .value\").innerText) > 0",
                               timeout=20_000)
        page.wait_for_function("() => document.querySelector(\".tile[data-k='ttft'] .value\").innerText !== '–'",
                               timeout=20_000)
        assert generated.inner_text() != before
        time.sleep(12 if os.environ.get("KVLOOM_SCREENSHOTS") == "1" else 2)  # some chart to see
        _screenshot(page, tmp_path, "web_dashboard.png")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    _wait_idle(server)
    page.wait_for_function("() => document.querySelector(\".tile[data-k='running'] .value\").innerText === '0'",
                           timeout=10_000)


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir):
    with ServerThread(tiny_engine(tiny_model_dir("llama")), api_key="sk-web-test") as s:
        yield s


def test_api_key_is_asked_for_and_kept_in_the_browser(keyed_server, page):
    s = keyed_server
    assert httpx.get(s.url + "/").status_code == 200            # pages load without a key
    assert httpx.get(s.url + "/dashboard").status_code == 200
    assert httpx.get(s.url + "/static/chat.js").status_code == 200
    assert httpx.get(s.url + "/server_info").status_code == 401
    assert httpx.get(s.url + "/dashboard/stats").status_code == 401   # their API calls need it
    assert httpx.get(s.url + "/dashboard/stats", headers={"Authorization": "Bearer sk-web-test"}).status_code == 200
    page.goto(s.url + "/")
    page.wait_for_selector("dialog.key[open]")
    page.fill("dialog.key input[type=password]", "wrong")
    page.click("dialog.key button[type=submit]")
    page.wait_for_selector("dialog.key[open] .why:has-text('did not accept')")
    page.fill("dialog.key input[type=password]", "sk-web-test")
    page.click("dialog.key button[type=submit]")
    page.wait_for_function("() => document.querySelector('#model').value === 'tiny'")
    assert page.evaluate("sessionStorage.getItem('kvloom.apiKey')") == "sk-web-test"
    assert page.evaluate("localStorage.getItem('kvloom.apiKey')") is None
    page.fill("#max_tokens", "8")
    page.fill("#prompt", "hi")
    page.click("#send")
    page.wait_for_selector("body[data-streaming='0'] .msg.assistant .figures .tokens")
    page.goto(s.url + "/dashboard")                              # same tab: the key is still there
    page.wait_for_function("() => document.querySelector(\".tile[data-k='requests'] .value\").innerText === '1'")
    assert page.locator("dialog.key[open]").count() == 0
