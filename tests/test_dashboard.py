"""The dashboard (`/`), in a real headless Chromium against the real stack (API, worker, broker, database).

Browser tests need Debian's `chromium` (/usr/bin/chromium) and the Python `playwright` package (driving that
browser: `playwright install` is never needed); without either they are skipped, with the reason. The HTTP checks
of the static files run everywhere. Screenshots (and the downloaded weights) go to $KILN_TEST_ARTIFACTS, else a
temporary directory; their paths are printed.

Every page is watched: an uncaught exception, a console error (other than the network statuses a test expects,
such as the 401 of a wrong key, or the 404 a test fakes for an older server), or a request to any
host but the server fails the test.
"""

import hashlib
import json
import os
import re
import struct
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from api.routes.dashboard import DASHBOARD_DIR
from kiln.client import TERMINAL
from kiln.spec import JobSpec

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

_MISSING = [
    what
    for what, ok in (
        ("Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)", CHROMIUM.exists()),
        ("the Python package playwright (pip install playwright)", sync_playwright is not None),
    )
    if not ok
]
browser_test = pytest.mark.skipif(bool(_MISSING), reason="the dashboard browser tests need " + " and ".join(_MISSING))

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]
# Long enough (a few hundred batches an epoch) that the page sees the curve grow, short enough to finish soon.
CURVE = {
    "name": "dash-curve",
    "model": {"type": "mlp", "hidden": [64, 64]},
    "data": {"dataset": "moons", "samples": 8000},
    "optimizer": {"type": "adam", "lr": 0.003},
    "epochs": 24,
    "batch_size": 16,
}
QUICK = {"name": "dash-quick", "data": {"dataset": "iris"}, "epochs": 30}
# Still running when the test cancels it, whatever the machine's speed.
LONG = {"name": "dash-long", "data": {"dataset": "regression", "samples": 20000}, "epochs": 10_000, "batch_size": 8}


# --- the static files, over plain HTTP ------------------------------------------------------------------


def test_page_and_assets_are_served_without_a_key(stack):
    import httpx

    with httpx.Client(base_url=stack.url, timeout=30) as http:  # no Authorization header at all
        page = http.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        assert "no-cache" in page.headers["cache-control"]
        html = page.text
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "no inline script (the CSP would block it)"
        assert not re.search(r"\son[a-z]+\s*=", html), "no inline event handlers"
        assert not re.search(r"\sstyle\s*=", html), "no inline styles"

        referenced = set(re.findall(r'(?:src|href)="(/dashboard/[^"]+)"', html))
        assert {"/dashboard/app.js", "/dashboard/style.css"} <= referenced
        for name in ("app.js", "api.js", "chart.js", "style.css", "presets.json", "favicon.svg"):
            response = http.get(f"/dashboard/{name}")
            assert response.status_code == 200, name
            assert response.headers["x-content-type-options"] == "nosniff"
            etag = response.headers["etag"]
            # Revalidation is a cheap 304; a changed file a fresh 200.
            assert http.get(f"/dashboard/{name}", headers={"If-None-Match": etag}).status_code == 304
            text = response.text
            # Nothing is fetched from elsewhere: no absolute URL but XML namespaces.
            assert not re.findall(r"https?://(?!www\.w3\.org/)", text), name
        assert http.get("/dashboard/app.js").headers["content-type"].startswith("text/javascript")
        assert http.get("/dashboard/style.css").headers["content-type"].startswith("text/css")
        assert http.head("/").status_code == 200

        for bad in ("/dashboard/nope.js", "/dashboard/..%2Fapp.py", "/dashboard/index.html", "/dashboard/.hidden.js"):
            assert http.get(bad).status_code == 404, bad
        assert http.get("/v1/jobs").status_code == 401, "the data itself still needs the key"
        assert "/" not in http.get("/openapi.json").json()["paths"], "the dashboard stays out of the API document"


def test_every_shipped_file_is_served():
    names = {p.name for p in DASHBOARD_DIR.iterdir() if p.is_file()}
    assert {"index.html", "app.js", "api.js", "chart.js", "style.css", "presets.json", "favicon.svg"} <= names


def test_presets_are_valid_specs():
    presets = json.loads((DASHBOARD_DIR / "presets.json").read_text())
    assert len(presets) >= 3
    for preset in presets:
        JobSpec.model_validate(preset["spec"])


# --- the browser ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    where = os.environ.get("KILN_TEST_ARTIFACTS")
    path = Path(where) if where else tmp_path_factory.mktemp("dashboard-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if _MISSING:
        pytest.skip("the dashboard browser tests need " + " and ".join(_MISSING))
    profile = tempfile.mkdtemp(prefix="kiln-chromium-", dir=tmp_path_factory.getbasetemp())
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            accept_downloads=True,
            viewport={"width": 1360, "height": 1000},
            color_scheme="light",
            timeout=60_000,
        )
        try:
            yield context
        finally:
            context.close()


class Watched:
    """A page with everything it logged and asked for, checked when the test ends."""

    def __init__(self, page, base_url: str, artifacts: Path):
        self.page = page
        self.base = base_url
        self.artifacts = artifacts
        self.errors: list[str] = []
        self.console_errors: list[tuple[str, str]] = []
        self.requests: list[str] = []
        self.allowed_statuses: set[int] = set()
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        page.on("console", self._console)
        page.on("request", lambda request: self.requests.append(request.url))
        page.on("websocket", lambda ws: self.requests.append(ws.url))

    def _console(self, message) -> None:
        if message.type in ("error", "assert"):
            self.console_errors.append((message.text, (message.location or {}).get("url", "")))

    def url(self, route: str) -> str:
        return f"{self.base}/{route}"

    def goto(self, route: str) -> None:
        self.page.goto(self.url(route))

    def sign_in(self, key: str, route: str = "#/jobs") -> None:
        self.goto("#/signin")
        self.page.fill("#signin-key", key)
        self.page.click("#signin-submit")
        self.page.wait_for_function("() => !location.hash.startsWith('#/signin')", timeout=30_000)
        if route != "#/jobs":
            self.goto(route)

    def shot(self, name: str, full_page: bool = True) -> Path:
        path = self.artifacts / name
        self.page.screenshot(path=str(path), full_page=full_page)
        print(f"screenshot: {path}")
        return path

    def check(self) -> None:
        expected = re.compile(r"Failed to load resource: the server responded with a status of (\d+)")
        unexpected = []
        for text, where in self.console_errors:
            match = expected.match(text)
            if match and int(match.group(1)) in self.allowed_statuses:
                continue
            unexpected.append(f"{text} ({where})")
        assert not self.errors, self.errors
        assert not unexpected, f"console errors: {unexpected}"
        origin = urlsplit(self.base)
        for url in self.requests:
            parts = urlsplit(url)
            if parts.scheme in ("data", "about"):
                continue
            if parts.scheme == "blob":
                parts = urlsplit(url[len("blob:"):])
            assert (parts.scheme, parts.netloc) == (origin.scheme, origin.netloc), f"a request left the server: {url}"


@pytest.fixture
def dash(browser, stack, artifacts):
    page = browser.new_page()
    page.set_default_timeout(30_000)
    watched = Watched(page, stack.url, artifacts)
    try:
        yield watched
        watched.check()
    finally:
        page.close()


def plotted(page, metric: str = "loss") -> int:
    return page.eval_on_selector(f'svg.chart[data-metric="{metric}"]', "svg => Number(svg.dataset.points || 0)")


def wait_for_more_points(page, than: int, timeout_s: float, metric: str = "loss") -> int:
    page.wait_for_function(
        """([metric, n]) => {
            const svg = document.querySelector(`svg.chart[data-metric="${metric}"]`);
            return svg && Number(svg.dataset.points || 0) > n;
        }""",
        arg=[metric, than],
        timeout=timeout_s * 1000,
    )
    return plotted(page, metric)


def weights_header(data: bytes) -> dict:
    """A safetensors file: 8 bytes little-endian header length, then that much JSON."""
    assert len(data) > 8
    (length,) = struct.unpack("<Q", data[:8])
    assert data[8:9] == b"{", data[:16]
    assert 8 + length <= len(data)
    return json.loads(data[8 : 8 + length])


@browser_test
def test_wrong_key_shows_the_servers_401_message(dash, stack):
    dash.allowed_statuses = {401}
    page = dash.page
    dash.goto("#/jobs")
    page.wait_for_function("() => location.hash === '#/signin'")  # no key yet: sent to sign in
    page.fill("#signin-key", "kiln_not_a_real_key")
    page.click("#signin-submit")
    error = page.locator("#signin-error")
    error.wait_for(state="visible")
    assert "Unknown API key" in error.inner_text()
    assert page.evaluate("() => location.hash") == "#/signin"
    dash.shot("signin-wrong-key.png")

    # A key that stops working mid-session (revoked, rotated) sends the user back with the server's sentence.
    dash.sign_in(stack.api_key)
    page.locator("#jobs-table:not([hidden]), .empty-state:not([hidden])").first.wait_for()
    # In one task, so the jobs page's own refresh cannot meet the revoked key first: it would send the user to sign
    # in with the sentence, and the move to #/datasets (leaving the sign-in page) would clear it, as it should.
    page.evaluate("() => { sessionStorage.setItem('kiln.apiKey', 'kiln_revoked_meanwhile'); location.hash = '#/datasets'; }")
    page.wait_for_function("() => location.hash === '#/signin'")
    assert "Unknown API key" in page.locator("#signin-error").inner_text()
    # Signing in again goes back to where the user was.
    page.fill("#signin-key", stack.api_key)
    page.click("#signin-submit")
    page.wait_for_function("() => location.hash === '#/datasets'")


@browser_test
def test_form_shows_validation_errors_per_field(dash, stack, client):
    page = dash.page
    dash.sign_in(stack.api_key, "#/new")
    page.locator("#presets button").first.wait_for()
    before = len(client.get("/v1/jobs", params={"limit": 200}).json()["items"])
    page.fill("#spec-input", json.dumps({"data": {"dataset": "iris"}, "epochs": 0, "model": {"type": "mlp", "hidden": [0]}}))
    dash.allowed_statuses = {422}
    page.click("#spec-submit")
    page.locator('#spec-errors li[data-field="body.epochs"]').wait_for()
    fields = page.eval_on_selector_all("#spec-errors li", "items => items.map(li => li.dataset.field)")
    assert set(fields) == {"body.epochs", "body.model.hidden.0"}
    assert "greater than or equal to 1" in page.locator('#spec-errors li[data-field="body.epochs"]').inner_text()
    dash.shot("new-job-errors.png")
    page.fill("#spec-input", "{not json")
    page.click("#spec-submit")
    page.get_by_text("Not valid JSON").wait_for()
    assert len(client.get("/v1/jobs", params={"limit": 200}).json()["items"]) == before, "nothing was created"


@browser_test
def test_submit_a_job_watch_its_curve_grow_and_download_the_weights(dash, stack, client):
    page = dash.page
    dash.sign_in(stack.api_key, "#/new")
    page.locator("#presets button").first.wait_for()
    page.fill("#spec-input", json.dumps(CURVE, indent=2))
    page.click("#spec-submit")
    page.wait_for_function("() => /^#\\/jobs\\/[^/]+$/.test(location.hash)")
    job_id = page.evaluate("() => decodeURIComponent(location.hash.slice('#/jobs/'.length))")
    assert client.get(f"/v1/jobs/{job_id}").json()["spec"]["name"] == "dash-curve"
    page.locator('svg.chart[data-metric="loss"]').wait_for()

    # The curve gains points as epochs land: watch the count climb, with a deadline on each step.
    counts = [plotted(page)]
    modes = set()
    started = time.monotonic()
    while counts[-1] < CURVE["epochs"]:
        counts.append(wait_for_more_points(page, counts[-1], timeout_s=180))
        modes.add(page.get_attribute("#live-mode", "data-mode"))
        if len(counts) == 3:
            dash.shot("job-running.png")
    elapsed = time.monotonic() - started
    print(f"plotted points over {elapsed:.1f} s: {counts} (live modes seen: {sorted(modes)})")
    assert "sse" in modes, f"the page did not follow the job's event stream: {modes}"
    growth = [c for c in counts if c > 0]  # each count is larger than the one before (wait_for_more_points)
    assert len(growth) >= 3, f"the curve did not visibly grow: {counts}"
    assert counts[-1] == CURVE["epochs"]
    for series in ("train_loss", "val_loss"):
        n = page.get_attribute(f'svg.chart[data-metric="loss"] path[data-series="{series}"]', "data-n")
        assert int(n) == CURVE["epochs"], series
    assert page.locator('svg.chart[data-metric="accuracy"]').count() == 1, "a classification job shows accuracy"
    assert page.locator('svg.chart[data-metric="lr"]').count() == 1
    assert page.locator('svg.chart[data-metric="grad_norm"]').count() == 1

    page.locator('#job-status[data-status="succeeded"]').wait_for(timeout=120_000)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded"
    assert page.inner_text("#job-progress") == f"{CURVE['epochs']} / {CURVE['epochs']} epochs"
    page.locator("#job-history li.succeeded").wait_for()
    assert json.loads(page.inner_text("#job-spec")) == job["spec"]
    assert page.locator("#cancel-btn").count() == 0, "nothing to cancel once finished"
    dash.shot("job-succeeded.png")

    # Hover the loss chart: the read-out names the epoch and both values. hover() waits for the chart's hit area,
    # which each redraw (every 5 s) replaces; measuring its box by hand could catch it between two.
    page.locator('svg.chart[data-metric="loss"] rect.hit').hover()
    tip = page.locator('.chart-card[data-metric="loss"] .tip')
    tip.wait_for(state="visible")
    assert "epoch" in tip.inner_text() and "val" in tip.inner_text()

    # The weights, through the page (fetched with the key, saved from a blob URL).
    with page.expect_download(timeout=60_000) as download_info:
        page.click("#download-btn")
    download = download_info.value
    assert download.suggested_filename == "dash-curve.safetensors"
    saved = dash.artifacts / download.suggested_filename
    download.save_as(str(saved))
    data = saved.read_bytes()
    header = weights_header(data)
    assert "__metadata__" in header
    served = client.get(f"/v1/jobs/{job_id}/weights")
    assert served.headers["etag"] == f'"{hashlib.sha256(data).hexdigest()}"', "the file the browser saved is the served one"
    page.get_by_text("verified").wait_for()  # the page checked the sha256 against the ETag too
    print(f"weights: {saved} ({len(data)} bytes)")

    background = "() => getComputedStyle(document.body).backgroundColor"
    page.emulate_media(color_scheme="dark")
    page.mouse.move(0, 0)
    assert page.evaluate(background) == "rgb(17, 19, 23)"  # the system's dark palette
    dash.shot("job-succeeded-dark.png")
    page.evaluate("() => { document.documentElement.dataset.theme = 'light'; }")  # what the toggle sets
    assert page.evaluate(background) == "rgb(247, 247, 248)"  # the toggle wins over the system
    page.evaluate("() => { delete document.documentElement.dataset.theme; }")
    page.emulate_media(color_scheme="light")
    assert page.evaluate(background) == "rgb(247, 247, 248)"


@browser_test
def test_cancel_a_running_job_from_its_page(dash, stack, client):
    page = dash.page
    job = client.post("/v1/jobs", json=LONG).json()
    try:
        dash.sign_in(stack.api_key, f"#/jobs/{job['id']}")
        page.locator('#job-status[data-status="running"]').wait_for(timeout=180_000)
        wait_for_more_points(page, 0, timeout_s=180)  # cancel it mid-run, with a curve on the page
        page.click("#cancel-btn")
        page.click("#cancel-confirm")
        page.locator('#job-status[data-status="cancelled"]').wait_for(timeout=120_000)
        after = client.get(f"/v1/jobs/{job['id']}").json()
        assert after["status"] == "cancelled"
        assert after["cancel_requested"] is True
        page.locator("#job-history li.cancelled").wait_for()
        assert page.locator("#cancel-btn").count() == 0
        assert page.locator("#download-btn").count() == 0, "no weights for a cancelled job"
        dash.shot("job-cancelled.png")
    finally:
        current = client.get(f"/v1/jobs/{job['id']}").json()
        if current["status"] not in TERMINAL:
            client.post(f"/v1/jobs/{job['id']}/cancel")


@browser_test
def test_jobs_list_shows_status_progress_and_sparklines(dash, stack, client):
    page = dash.page
    done = client.post("/v1/jobs", json=QUICK).json()
    stack.wait_for_job(client, done["id"], lambda j: j["status"] in TERMINAL, timeout=180)
    dash.sign_in(stack.api_key)
    row = page.locator(f'#jobs-table tr[data-job-id="{done["id"]}"]')
    row.wait_for()
    assert row.locator(".badge").inner_text().lower() == "succeeded"
    assert row.locator('[role="progressbar"]').get_attribute("aria-valuenow") == "30"
    row.locator("svg.spark").wait_for()
    assert int(row.locator("svg.spark").get_attribute("data-n")) > 1
    assert int(row.locator("svg.spark").get_attribute("data-n")) <= 40

    # The list refreshes by itself: a job submitted elsewhere appears without a reload.
    queued = client.post("/v1/jobs", json={**QUICK, "name": "dash-appears"}).json()
    page.locator(f'#jobs-table tr[data-job-id="{queued["id"]}"]').wait_for(timeout=30_000)
    stack.wait_for_job(client, queued["id"], lambda j: j["status"] in TERMINAL, timeout=180)
    page.locator(f'#jobs-table tr[data-job-id="{queued["id"]}"] .badge[data-status="succeeded"]').wait_for(timeout=30_000)
    page.locator(f'#jobs-table tr[data-job-id="{queued["id"]}"] svg.spark').wait_for(timeout=30_000)

    # Filters go to the server.
    page.click('.chips button[data-status="failed"]')
    page.locator(f'#jobs-table tr[data-job-id="{done["id"]}"]').wait_for(state="detached")
    page.click('.chips button[data-status=""]')
    row.wait_for()
    dash.shot("jobs.png")

    page.click(f'#jobs-table tr[data-job-id="{done["id"]}"] td.name a')
    page.wait_for_function(f"() => location.hash === '#/jobs/{done['id']}'")
    page.locator('#job-status[data-status="succeeded"]').wait_for()


@browser_test
def test_datasets_page_lists_and_uploads(dash, stack, tmp_path):
    page = dash.page
    rows = ["a,b,label"] + [f"{i % 7},{(i * 3) % 5},{i % 2}" for i in range(40)]
    good = tmp_path / "dash-upload.csv"
    good.write_text("\n".join(rows) + "\n")
    dash.sign_in(stack.api_key, "#/datasets")
    page.locator("#upload-form").wait_for()

    page.set_input_files("#ds-file", str(good))
    assert page.input_value("#ds-name") == "dash-upload"
    page.fill("#ds-target", "label")
    page.click("#ds-submit")
    page.locator("#ds-result .callout.ok").wait_for()
    assert "40 rows" in page.inner_text("#ds-result")
    row = page.locator("#datasets-table tr", has_text="dash-upload")
    row.wait_for()
    assert "binary" in row.inner_text()

    dash.allowed_statuses = {422}
    short = tmp_path / "short.csv"
    short.write_text("a,label\n1,0\n2,1\n")
    page.set_input_files("#ds-file", str(short))
    page.fill("#ds-name", "short")
    page.fill("#ds-target", "label")
    page.click("#ds-submit")
    page.locator("#ds-result .callout.error").wait_for()
    assert "The upload is invalid" in page.inner_text("#ds-result")
    dash.shot("datasets.png")

    # "Train" fills the new-job form with the upload's id.
    row.locator("a", has_text="Train").click()
    page.wait_for_function("() => location.hash.startsWith('#/new?dataset=')")
    page.wait_for_function("() => (document.querySelector('#spec-input')?.value || '').includes('dash-upload')")


@browser_test
def test_workers_page(dash, stack):
    page = dash.page
    dash.sign_in(stack.api_key, "#/workers")
    # The stack's training worker and its predictor, each with a name and a state.
    page.locator('#workers-table tbody .badge[data-status="online"]').first.wait_for()
    names = page.eval_on_selector_all("#workers-table tbody tr", "rows => rows.map(r => r.dataset.worker)")
    assert len(names) >= 2 and "?" not in names, names
    dash.shot("workers.png")

    # A server without the registry: the page says so instead of failing.
    dash.allowed_statuses = {404}
    page.route(re.compile(r".*/v1/workers(\?.*)?$"), lambda route: json_reply(
        route, {"error": {"code": "not_found", "message": "Not Found.", "details": None}}, 404))
    page.reload()
    page.locator("#workers-unavailable").wait_for()
    assert page.inner_text("#workers-unavailable") == "worker registry not available on this server"


FAKE_JOB_ID = "00000000-0000-4000-8000-00000000e7e7"


def fake_job(epochs_done: int, status: str = "running", total: int = 6) -> dict:
    """A Job as the API shapes it, for a job that exists only in a test's routes."""
    return {
        "id": FAKE_JOB_ID, "name": "streamed", "status": status,
        "spec": {"name": "streamed", "data": {"dataset": "iris"}, "epochs": total, "model": {"type": "mlp"}},
        "created_at": "2026-01-01T00:00:00Z", "started_at": "2026-01-01T00:00:01Z",
        "finished_at": "2026-01-01T00:00:09Z" if status in TERMINAL else None,
        "epochs_completed": epochs_done, "checkpoint_epoch": epochs_done, "attempt": 1, "worker": "w@test",
        "cancel_requested": False, "latest_metrics": fake_epoch(epochs_done) if epochs_done else None, "error": None,
        "stop_reason": None, "lr_search": None,
    }


def fake_epoch(n: int) -> dict:
    return {"epoch": n, "attempt": 1, "train_loss": 1.0 / n, "val_loss": 1.2 / n, "val_accuracy": 0.5 + n / 20,
            "lr": 0.001, "duration_s": 0.1, "samples_per_s": 1000.0, "grad_norm": 0.5, "grad_norm_per_layer": None,
            "train_accuracy": 0.5 + n / 25, "val_r2": None}


FAKE_JOB_ROUTES = re.compile(rf".*/v1/jobs/{FAKE_JOB_ID}(/.*)?(\?.*)?$")


def json_reply(route, body: dict, status: int = 200) -> None:
    route.fulfill(status=status, content_type="application/json", body=json.dumps(body))


@browser_test
def test_job_page_follows_the_event_stream(dash, stack):
    """The Server-Sent Events client, whatever this server serves: the job, its metrics and its stream are
    answered by the test (Playwright routes), including a dropped stream resumed with Last-Event-ID."""
    page = dash.page
    state = {"finished": False, "streams": []}

    def handle(route):
        request = route.request
        path = urlsplit(request.url).path
        if path == f"/v1/jobs/{FAKE_JOB_ID}":
            return json_reply(route, fake_job(6, "succeeded") if state["finished"] else fake_job(2))
        if path == f"/v1/jobs/{FAKE_JOB_ID}/metrics":
            upto = 6 if state["finished"] else 2
            return json_reply(route, {"job_id": FAKE_JOB_ID, "epochs": [fake_epoch(n) for n in range(1, upto + 1)]})
        if path == f"/v1/jobs/{FAKE_JOB_ID}/history":
            return json_reply(route, {"job_id": FAKE_JOB_ID, "events": []})
        if path == f"/v1/jobs/{FAKE_JOB_ID}/events":
            assert request.headers.get("authorization") == f"Bearer {stack.api_key}"
            state["streams"].append(request.headers.get("last-event-id"))
            if len(state["streams"]) == 1:
                # Two epochs, then the connection drops (no `end`): the page must come back with Last-Event-ID.
                body = f"retry: 100\n\n: keep-alive\n\nid: 2\nevent: status\ndata: {json.dumps(fake_job(2))}\n\n"
                body += "".join(f"id: {n}\nevent: epoch\ndata: {json.dumps(fake_epoch(n))}\n\n" for n in (3, 4))
            else:
                state["finished"] = True
                body = "".join(f"id: {n}\r\nevent: epoch\r\ndata: {json.dumps(fake_epoch(n))}\r\n\r\n" for n in (5, 6))
                body += f"id: 6\nevent: end\ndata: {json.dumps(fake_job(6, 'succeeded'))}\n\n"
            return route.fulfill(status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
                                 body=body)
        return route.continue_()

    page.route(FAKE_JOB_ROUTES, handle)
    dash.sign_in(stack.api_key, f"#/jobs/{FAKE_JOB_ID}")
    page.locator('svg.chart[data-metric="loss"]').wait_for()
    page.locator('#job-status[data-status="succeeded"]').wait_for(timeout=30_000)
    page.wait_for_function("() => document.querySelector('svg.chart[data-metric=\"loss\"]')?.dataset.points === '6'")
    # The first connection resumes after the epochs the page loaded; the second after the ones streamed.
    assert state["streams"] == ["2", "4"], state["streams"]
    assert page.get_attribute('svg.chart[data-metric="accuracy"] path[data-series="val_accuracy"]', "data-n") == "6"
    page.locator("#download-btn").wait_for()


@browser_test
def test_job_page_polls_a_server_without_an_event_stream(dash, stack):
    """An older server answers 404 to /events: the page asks for new epochs (?since=N) every second instead."""
    page = dash.page
    state = {"epochs": 1, "since": [], "modes": set()}

    def handle(route):
        request = route.request
        parts = urlsplit(request.url)
        path = parts.path
        if path == f"/v1/jobs/{FAKE_JOB_ID}/events":
            return json_reply(route, {"error": {"code": "not_found", "message": "Not Found.", "details": None}}, 404)
        if path == f"/v1/jobs/{FAKE_JOB_ID}/metrics":
            query = dict(p.split("=") for p in parts.query.split("&") if p)
            since = int(query.get("since", 0))
            state["since"].append(since)
            if since:  # every poll, one more epoch lands
                state["epochs"] = min(4, state["epochs"] + 1)
            epochs = [fake_epoch(n) for n in range(since + 1, state["epochs"] + 1)]
            return json_reply(route, {"job_id": FAKE_JOB_ID, "epochs": epochs})
        if path == f"/v1/jobs/{FAKE_JOB_ID}":
            done = state["epochs"] >= 4 and len(state["since"]) > 4
            return json_reply(route, fake_job(state["epochs"], "succeeded" if done else "running", total=4))
        if path == f"/v1/jobs/{FAKE_JOB_ID}/history":
            return json_reply(route, {"job_id": FAKE_JOB_ID, "events": []})
        return route.continue_()

    dash.allowed_statuses = {404}  # the /events answer above
    page.route(FAKE_JOB_ROUTES, handle)
    dash.sign_in(stack.api_key, f"#/jobs/{FAKE_JOB_ID}")
    page.locator('#live-mode[data-mode="poll"]').wait_for(timeout=30_000)
    assert page.inner_text("#live-mode") == "live · polling"
    page.locator('#job-status[data-status="succeeded"]').wait_for(timeout=30_000)
    assert plotted(page) == 4
    assert state["since"][0] == 0 and state["since"][1:4] == [1, 2, 3], state["since"]
    assert page.get_attribute("#live-mode", "data-mode") == "off"
