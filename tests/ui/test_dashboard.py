"""The dashboard at /ui in real Chromium, against a real `orq-proxy serve`: sign-in, the identities table,
search and tags, create with a budget, the ring and Reset, budgets, reports with CSV, XSS, key refusal."""

from __future__ import annotations

import csv
import io
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from tests.ui.support import ADMIN, REQUEST_COST_USD, REQUEST_TOKENS, USER, Proxy, screenshot, until

XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def seeded(proxy: Proxy) -> Proxy:
    """alice (3 requests, tags beta+vip), bob (1 request, tag beta), carol (no traffic), all through the
    proxy's API and the openai SDK; returns once reporting has seen every request."""
    for external_id, name, tags in [
        ("alice", "Alice Anders", ["beta", "vip"]),
        ("bob", "Bob Brown", ["beta"]),
        ("carol", "Carol Chen", []),
    ]:
        proxy.api(
            "POST",
            "/v2/identities",
            json={
                "external_id": external_id,
                "display_name": name,
                "email": f"{external_id}@example.com",
                "tags": tags,
            },
        )
    proxy.chat("alice", 3)
    proxy.chat("bob", 1)
    until(lambda: proxy.requests_of("alice") == 3 and proxy.requests_of("bob") == 1, 10, "events reported")
    return proxy


def sign_in(page: Any, proxy: Proxy, key: str = ADMIN, path: str = "") -> None:
    page.goto(f"{proxy.url}/ui{path}")
    page.get_by_label("Admin API key").fill(key)
    page.get_by_role("button", name="Sign in").click()


def row(page: Any, external_id: str) -> Any:
    return page.locator(f'#identities-table tr[data-external-id="{external_id}"]')


def on_a_phone(page: Any, tmp_path: Path, name: str) -> None:
    """At 390 px wide the page does not scroll sideways (wide tables scroll inside their box); screenshot."""
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_function("() => document.documentElement.scrollWidth <= window.innerWidth", timeout=2000)
    screenshot(page, tmp_path, f"{name}-phone")
    page.set_viewport_size({"width": 1280, "height": 800})


def shown_ids(page: Any) -> list[str]:
    return sorted(
        page.locator("#identities-table tbody tr").evaluate_all("rows => rows.map(r => r.dataset.externalId)")
    )


def test_sign_in_shows_the_identities_with_their_requests_and_cost(
    seeded: Proxy, page: Any, tmp_path: Path
) -> None:
    """After signing in, the table has each seeded identity with the request count and cost the API has."""
    sign_in(page, seeded)
    expect(row(page, "alice")).to_be_visible()
    listed = {
        i["external_id"]: i["metrics"]
        for i in seeded.api("GET", "/v2/identities?include_metrics=true&limit=50")["data"]
    }
    assert listed["alice"]["total_requests"] == 3
    assert listed["alice"]["total_cost"] == pytest.approx(3 * REQUEST_COST_USD)
    for external_id, requests, cost in [
        ("alice", "3", "$0.66"),
        ("bob", "1", "$0.22"),
        ("carol", "0", "$0.00"),
    ]:
        expect(row(page, external_id).locator('[data-col="requests"]')).to_have_text(requests)
        expect(row(page, external_id).locator('[data-col="cost"]')).to_have_text(cost)
    expect(row(page, "alice").locator('[data-col="tokens"]')).to_have_text(str(3 * REQUEST_TOKENS))
    expect(row(page, "alice")).to_contain_text("Alice Anders")
    expect(row(page, "alice")).to_contain_text("vip")
    # The key is held for the tab only: in sessionStorage, never in localStorage or a cookie.
    assert page.evaluate("() => [localStorage.length, document.cookie]") == [0, ""]
    assert page.evaluate("() => Object.values(sessionStorage)") == [ADMIN]
    screenshot(page, tmp_path, "ui-identities")
    on_a_phone(page, tmp_path, "ui-identities")


def test_search_and_the_tag_filter_narrow_the_table(seeded: Proxy, page: Any) -> None:
    """Searching "ali" leaves alice; one character does not search; tag vip leaves alice, beta alice and bob."""
    sign_in(page, seeded)
    expect(row(page, "carol")).to_be_visible()
    search = page.get_by_label("Search")
    search.fill("ali")
    expect(page.locator("#identities-table tbody tr")).to_have_count(1)
    assert shown_ids(page) == ["alice"]
    search.fill("a")
    expect(page.locator("#search-hint")).to_have_text("Type at least 2 characters to search.")
    search.fill("")
    search.press("Enter")
    expect(row(page, "carol")).to_be_visible()
    tags = page.get_by_label("Tags (all of)")
    tags.fill("vip")
    tags.press("Enter")
    expect(row(page, "bob")).to_have_count(0)
    assert shown_ids(page) == ["alice"]
    tags.fill("beta")
    tags.press("Enter")
    expect(row(page, "bob")).to_be_visible()
    assert shown_ids(page) == ["alice", "bob"]


def test_pages_go_forward_and_back_and_sort_by_name(seeded: Proxy, page: Any) -> None:
    """30 identities tagged `paged`: 25 on the first page (newest first), 5 after Next, the same 25 after
    Previous; sorted by name the first row is the first name."""
    made: list[str] = []
    for i in range(30):
        body = {"external_id": f"page-{i:02d}", "display_name": f"Page {i:02d}", "tags": ["paged"]}
        made.append(seeded.api("POST", "/v2/identities", json=body)["identity"]["_id"])
    try:
        sign_in(page, seeded)
        expect(row(page, "page-29")).to_be_visible()
        tags = page.get_by_label("Tags (all of)")
        tags.fill("paged")
        tags.press("Enter")
        rows = page.locator("#identities-table tbody tr")
        expect(rows.first).to_have_attribute("data-external-id", "page-29")
        expect(rows).to_have_count(25)
        previous, following = (
            page.get_by_role("button", name="Previous"),
            page.get_by_role("button", name="Next"),
        )
        expect(previous).to_be_disabled()
        following.click()
        expect(rows).to_have_count(5)
        assert shown_ids(page) == [f"page-{i:02d}" for i in range(5)]
        expect(following).to_be_disabled()
        previous.click()
        expect(rows).to_have_count(25)
        expect(rows.first).to_have_attribute("data-external-id", "page-29")
        expect(previous).to_be_disabled()
        page.get_by_label("Sort by").select_option(label="Name")
        expect(rows.first).to_have_attribute("data-external-id", "page-00")
    finally:  # the other tests see the seeded identities on the first page
        for identity_id in made:
            seeded.api("DELETE", f"/v2/identities/{identity_id}")


def test_create_with_a_monthly_budget_then_the_ring_moves_and_reset_zeroes_it(
    seeded: Proxy, page: Any, tmp_path: Path
) -> None:
    """The form creates dana and a Monthly $10 budget (both seen through the API); five requests move the
    ring to $1.10 (11%); Reset brings the API's usage back to 0."""
    sign_in(page, seeded)
    page.get_by_role("button", name="Create identity").click()
    dialog = page.get_by_role("dialog", name="Create identity")
    dialog.get_by_label("External ID").fill("dana")
    dialog.get_by_label("Display name").fill("Dana Diaz")
    dialog.get_by_label("Email").fill("dana@example.com")
    dialog.get_by_label("Budget").check()
    dialog.get_by_label("Period").select_option(label="Monthly")
    dialog.get_by_label("Amount (USD)").fill("10")
    dialog.get_by_role("button", name="Create").click()
    expect(page.locator("#identity-name")).to_have_text("Dana Diaz")

    identity = seeded.api("GET", "/v2/identities/dana")["identity"]
    assert identity["email"] == "dana@example.com"
    budgets = seeded.api("GET", "/v2/budgets?scope_kind=BUDGET_SCOPE_KIND_IDENTITY&scope_target_id=dana")[
        "data"
    ]
    assert len(budgets) == 1
    budget = budgets[0]
    assert budget["limits"]["period"] == "BUDGET_PERIOD_MONTHLY" and budget["limits"]["amount"] == 10
    assert budget["scope"] == {"identity": {"identityExternalId": "dana"}} and budget["isActive"] is True
    expect(page.locator("#ring-used")).to_have_text("$0.00 of $10.00")

    seeded.chat("dana", 5)
    until(lambda: seeded.requests_of("dana") == 5, 10, "dana's requests reported")
    page.reload()
    expect(page.locator("#ring-used")).to_have_text("$1.10 of $10.00")
    expect(page.locator(".ring")).to_have_attribute("data-percent", "11")
    expect(page.locator(".ring")).to_contain_text("Monthly budget")
    expect(page.locator(".ring")).to_contain_text("Resets")
    assert_chart_drawn(page, "#identity-chart")
    screenshot(page, tmp_path, "ui-identity")
    on_a_phone(page, tmp_path, "ui-identity")

    page.get_by_role("button", name="Reset", exact=True).click()
    expect(page.locator("#ring-used")).to_have_text("$0.00 of $10.00")
    usage = seeded.api("GET", f"/v2/budgets/{budget['budgetId']}")["budget"]["usage"]
    assert usage["amount"] == 0 and usage["tokens"] == 0


def test_an_identity_is_edited_and_deleted_after_a_confirmation(seeded: Proxy, page: Any) -> None:
    """Edit saves name, tags and metadata through the API; Delete asks first (Cancel keeps it), then
    deletes it (the API answers 404) and goes back to the list."""
    erin = seeded.api("POST", "/v2/identities", json={"external_id": "erin", "display_name": "Erin"})[
        "identity"
    ]
    sign_in(page, seeded, path=f"#/identities/{erin['_id']}")
    expect(page.locator("#identity-name")).to_have_text("Erin")
    page.get_by_role("button", name="Edit", exact=True).click()
    dialog = page.get_by_role("dialog", name="Edit identity")
    dialog.get_by_label("Display name").fill("Erin Evans")
    dialog.get_by_label("Tags").fill("ops, eu")
    dialog.get_by_label("Metadata (JSON object)").fill('{"plan": "pro"}')
    dialog.get_by_role("button", name="Save").click()
    expect(page.locator("#identity-name")).to_have_text("Erin Evans")
    saved = seeded.api("GET", "/v2/identities/erin")["identity"]
    assert (saved["display_name"], saved["tags"], saved["metadata"]) == (
        "Erin Evans",
        ["ops", "eu"],
        {"plan": "pro"},
    )

    page.get_by_role("button", name="Delete", exact=True).click()
    page.get_by_role("dialog", name="Delete identity").get_by_role("button", name="Cancel").click()
    assert seeded.admin.get("/v2/identities/erin").status_code == 200
    page.get_by_role("button", name="Delete", exact=True).click()
    page.get_by_role("dialog", name="Delete identity").get_by_role("button", name="Delete identity").click()
    expect(page.get_by_role("heading", name="Identities")).to_be_visible()
    assert seeded.admin.get("/v2/identities/erin").status_code == 404


def test_budgets_page_creates_disables_and_resets(seeded: Proxy, page: Any, tmp_path: Path) -> None:
    """A model budget made with the form appears with the API's values; Edit changes its amount and
    Disable turns it off, both seen through the API; a used budget shows its usage and Reset zeroes it."""
    seeded.api(
        "POST",
        "/v2/budgets",
        json={
            "scope": {"identity": {"identity_external_id": "alice"}},
            "limits": {"period": "BUDGET_PERIOD_DAILY", "amount": 2},
        },
    )
    seeded.chat("alice", 1)
    sign_in(page, seeded, path="#/budgets")
    page.get_by_role("button", name="Create budget").click()
    dialog = page.get_by_role("dialog", name="Create budget")
    dialog.get_by_label("Scope").select_option(label="Model")
    dialog.get_by_label("Target").fill("openai/other-model")
    dialog.get_by_label("Period").select_option(label="Weekly")
    dialog.get_by_label("Amount (USD)").fill("5")
    dialog.get_by_label("Requests per minute").fill("100")
    dialog.get_by_role("button", name="Create").click()
    expect(dialog).to_have_count(0)
    made = [b for b in seeded.api("GET", "/v2/budgets")["data"] if b.get("scope", {}).get("model")]
    assert len(made) == 1
    assert made[0]["scope"]["model"]["modelId"] == "openai/other-model"
    assert made[0]["limits"] == {"period": "BUDGET_PERIOD_WEEKLY", "amount": 5}
    assert made[0]["rateLimit"] == {"requestsPerMinute": 100}
    model_row = page.locator(f'#budgets-table tr[data-budget-id="{made[0]["budgetId"]}"]')
    expect(model_row).to_contain_text("Model: openai/other-model")
    expect(model_row).to_contain_text("Active")

    alice_row = page.locator("#budgets-table tr", has_text="Identity: alice")
    expect(alice_row).to_contain_text("$0.22 of $2.00")
    screenshot(page, tmp_path, "ui-budgets")
    on_a_phone(page, tmp_path, "ui-budgets")

    model_row.get_by_role("button", name=re.compile("^Edit")).click()
    edit = page.get_by_role("dialog", name="Edit budget")
    edit.get_by_label("Amount (USD)").fill("7.5")
    edit.get_by_role("button", name="Save").click()
    expect(model_row).to_contain_text("$7.50")
    assert seeded.api("GET", f"/v2/budgets/{made[0]['budgetId']}")["budget"]["limits"]["amount"] == 7.5
    model_row.get_by_role("button", name=re.compile("^Disable")).click()
    expect(model_row).to_contain_text("Disabled")
    assert seeded.api("GET", f"/v2/budgets/{made[0]['budgetId']}")["budget"]["isActive"] is False
    alice_row.get_by_role("button", name=re.compile("^Reset")).click()
    expect(alice_row).to_contain_text("$0.00 of $2.00")


def assert_chart_drawn(page: Any, selector: str) -> None:
    """uPlot drew into a canvas: it exists, has a size, and has non-transparent pixels."""
    canvas = page.locator(f"{selector} canvas")
    expect(canvas).to_have_count(1)
    painted = canvas.evaluate(
        """c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                  let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return [c.width, n]; }"""
    )
    assert painted[0] > 200 and painted[1] > 100, painted


def test_a_report_draws_a_chart_and_its_csv_holds_the_rows_the_api_returns(
    seeded: Proxy, page: Any, tmp_path: Path
) -> None:
    """Requests per day by identity over 7 days: a drawn chart, and a CSV equal to the API's rows."""
    sign_in(page, seeded, path="#/reports")
    page.get_by_label("Metric").select_option(label="Requests")
    page.get_by_label("Range").select_option(label="Last 7 days")
    page.get_by_label("Grain").select_option(label="Day")
    page.get_by_label("Group by").select_option(label="Identity")
    page.get_by_role("button", name="Run report").click()
    expect(page.locator("#report-table tbody tr").first).to_be_visible()
    expect(page.locator("#report-table")).to_contain_text("alice")
    assert_chart_drawn(page, "#report-chart")
    screenshot(page, tmp_path, "ui-reports")
    on_a_phone(page, tmp_path, "ui-reports")

    with page.expect_download() as info:
        page.get_by_role("button", name="Download CSV").click()
    download = info.value
    assert download.suggested_filename.endswith(".csv")
    text = Path(download.path()).read_text()
    got = list(csv.reader(io.StringIO(text)))
    assert got[0] == ["timestamp", "identity", "genai.requests"]

    now = time.time()
    report = seeded.api(
        "POST",
        "/v2/reporting",
        json={
            "metric": "genai.requests",
            "from": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 7 * 86400)),
            "to": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 60)),
            "grain": "day",
            "group_by": ["identity"],
            "time_zone": "UTC",
            "limit": 5000,
        },
    )
    expected = [
        [r["timestamp"], r["dimensions"].get("identity", ""), str(r["metrics"]["genai.requests"])]
        for r in report["data"]
    ]
    assert sorted(got[1:]) == sorted(expected)
    assert [r[1] for r in got[1:] if r[1] == "alice"] == ["alice"]


def test_an_identity_named_like_markup_is_shown_as_text(seeded: Proxy, page: Any) -> None:
    """Names, ids, tags and metadata with HTML in them are literal text in the table and on the detail
    page: nothing runs (the page fixture fails on any dialog) and no element is made from them."""
    created = seeded.api(
        "POST",
        "/v2/identities",
        json={
            "external_id": "<script>alert(2)</script>",
            "display_name": XSS,
            "tags": ["<b>bold</b>"],
            "metadata": {"<i>k</i>": "<svg onload=alert(3)>"},
        },
    )["identity"]
    sign_in(page, seeded)
    page.get_by_label("Search").fill("img")
    link = page.get_by_role("link", name=XSS)
    expect(link).to_be_visible()
    expect(page.locator("#identities-table")).to_contain_text("<b>bold</b>")
    link.click()
    expect(page.locator("#identity-name")).to_have_text(XSS)
    expect(page.locator("main")).to_contain_text("<script>alert(2)</script>")
    expect(page.locator("main")).to_contain_text("<svg onload=alert(3)>")
    assert page.locator("main img, main script, main b, main i, main svg[onload]").count() == 0
    page.wait_for_timeout(200)  # let an injected handler (there must be none) fire before the checks
    seeded.api("DELETE", f"/v2/identities/{created['_id']}")


def test_a_non_admin_key_is_refused_with_a_clear_message(seeded: Proxy, page: Any) -> None:
    """The non-admin key gets "this key cannot manage identities" and is not kept; an unknown key is
    "not recognised"."""
    sign_in(page, seeded, key=USER)
    expect(page.get_by_role("alert")).to_contain_text("This key cannot manage identities")
    assert page.evaluate("() => sessionStorage.length") == 0
    expect(page.locator("#nav")).to_be_hidden()
    page.get_by_label("Admin API key").fill("sk-nobody")
    page.get_by_label("Admin API key").press("Enter")
    expect(page.get_by_role("alert")).to_contain_text("not recognised")


def test_the_dashboard_works_with_the_keyboard(seeded: Proxy, page: Any) -> None:
    """Sign in with Enter (the focus then moves to the page's content), reach the Budgets link with
    Shift+Tab, open it with Enter; Enter opens a dialog and Escape closes it."""
    page.goto(f"{seeded.url}/ui")
    expect(page.get_by_label("Admin API key")).to_be_focused()
    page.keyboard.type(ADMIN)
    page.keyboard.press("Enter")
    expect(row(page, "alice")).to_be_visible()
    budgets_link = page.get_by_role("link", name="Budgets")
    for _ in range(6):
        page.keyboard.press("Shift+Tab")
        if budgets_link.evaluate("el => el === document.activeElement"):
            break
    expect(budgets_link).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Budgets")).to_be_visible()
    page.get_by_role("button", name="Create budget").focus()
    page.keyboard.press("Enter")
    expect(page.get_by_role("dialog")).to_be_visible()
    page.keyboard.press("Escape")
    expect(page.get_by_role("dialog")).to_have_count(0)


def test_ui_responses_carry_the_csp_and_serve_only_the_package_files(seeded: Proxy) -> None:
    """/ui needs no key; every response has the CSP and nosniff; files have their content types; paths
    outside static/ (raw or encoded traversal) are 404."""
    with httpx.Client(base_url=seeded.url) as client:
        page = client.get("/ui")
        assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
        csp = page.headers["content-security-policy"]
        for directive in [
            "default-src 'self'",
            "script-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ]:
            assert directive in csp
        assert "unsafe-inline" not in csp and "<script>" not in page.text and " style=" not in page.text
        assert page.headers["x-content-type-options"] == "nosniff"
        assert client.get("/ui/", follow_redirects=True).url.path == "/ui"
        for path, content_type in [
            ("/ui/static/js/app.js", "text/javascript; charset=utf-8"),
            ("/ui/static/app.css", "text/css; charset=utf-8"),
            ("/ui/static/vendor/uPlot.iife.min.js", "text/javascript; charset=utf-8"),
            ("/ui/static/vendor/LICENSE", "text/plain; charset=utf-8"),
        ]:
            response = client.get(path)
            assert response.status_code == 200 and response.headers["content-type"] == content_type, path
            assert response.headers["content-security-policy"] == csp
            again = client.get(path, headers={"If-None-Match": response.headers["etag"]})
            assert again.status_code == 304
        for path in [
            "/ui/static/../assets.py",
            "/ui/static/%2e%2e/assets.py",
            "/ui/static/..%2fassets.py",
            "/ui/static/%2e%2e%2f%2e%2e%2fapp.py",
            "/ui/static//etc/passwd",
            "/ui/static/js/../../assets.py",
            "/ui/static/",
            "/ui/index.html/../assets.py",
        ]:
            response = client.get(path)
            assert response.status_code == 404, (path, response.status_code)
            assert "import" not in response.text, path


def test_no_script_builds_markup_from_strings() -> None:
    """The dashboard's own scripts never parse strings as HTML (the XSS test covers what reaches the page)."""
    scripts = Path(__file__).resolve().parents[2] / "orq_proxy" / "ui" / "static" / "js"
    for script in scripts.glob("*.js"):
        text = script.read_text()
        for sink in (
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "new Function",
        ):
            assert sink not in text, f"{script.name} uses {sink}"
