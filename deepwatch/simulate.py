"""A generator of realistic web traffic for a small web shop, with labelled attacks.

Visitors arrive over the day (busier in the afternoon and evening), each from an address of a
real country (drawn at random, then located with the offline ``iptocc`` table) with a browser
from a believable mix. A visit follows the shop's site map: a landing page (often from a search
engine), then category, product, search, cart and checkout pages, each page followed by its
static assets (the first view downloads them, later views often get ``304``), with the previous
page as referer and human think time between pages. Crawlers fetch ``robots.txt`` and pages.

Attacks come from their own clients, each with its own label: ``sqli``, ``xss``, ``traversal``,
``scanner`` (a vulnerability-scanner crawl), ``bruteforce`` (credential guessing on the login
form) and ``flood`` (a request flood). Logs are written in combined format, one file per label
(``normal.log``, ``sqli.log``, ...), so ``evaluate`` can read them as ``PATH=LABEL``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

from .errors import OutputError, UsageError

SITE = "shop.example.com"
DAY_S = 86_400.0
ATTACKS = ("sqli", "xss", "traversal", "scanner", "bruteforce", "flood")

CATEGORIES = ("shoes", "jackets", "bags", "hats", "socks", "gloves", "scarves", "belts")
PRODUCTS = {c: [f"{c}-{w}-{i}" for w in ("classic", "urban", "trail", "summer", "merino")
                for i in range(1, 4)] for c in CATEGORIES}
SEARCH_TERMS = ("red shoes", "waterproof jacket", "leather bag", "wool hat", "gift", "sale",
                "running", "kids", "black belt", "winter gloves", "size 42", "merino socks")
PAGE_ASSETS = ("/static/css/site.css", "/static/js/app.js", "/static/js/vendor.js",
               "/static/img/logo.svg", "/favicon.ico")

#: (weight, user agent) of people's browsers, 2024-ish.
BROWSERS: tuple[tuple[float, str], ...] = (
    (30, "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
         "Chrome/124.0.0.0 Safari/537.36"),
    (14, "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
         "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1"),
    (14, "Mozilla/5.0 (Linux; Android 14; SM-S911B) AppleWebKit/537.36 (KHTML, like Gecko) "
         "Chrome/124.0.0.0 Mobile Safari/537.36"),
    (10, "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like "
         "Gecko) Version/17.4 Safari/605.1.15"),
    (8, "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/124.0.0.0 Safari/537.36 Edg/124.0.2478.67"),
    (7, "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:125.0) Gecko/20100101 Firefox/125.0"),
    (6, "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/124.0.0.0 Safari/537.36"),
    (4, "Mozilla/5.0 (iPad; CPU OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Version/17.4 Mobile/15E148 Safari/604.1"),
    (3, "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0"),
    (2, "Mozilla/5.0 (X11; Ubuntu; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/123.0.0.0 Safari/537.36"),
)
CRAWLERS = (
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
    "Mozilla/5.0 (compatible; YandexBot/3.0; +http://yandex.com/bots)",
)
#: (weight, country code) of the shop's visitors.
COUNTRIES = (("US", 30), ("DE", 14), ("GB", 10), ("FR", 9), ("NL", 5), ("CA", 5), ("ES", 4),
             ("IT", 4), ("SE", 3), ("PL", 3), ("JP", 3), ("BR", 3), ("IN", 3), ("AU", 2),
             ("CH", 2))
REFERRERS = ("https://www.google.com/", "https://www.bing.com/", "https://duckduckgo.com/",
             "https://www.instagram.com/", "https://www.facebook.com/")


@dataclass
class Line:
    at: datetime
    ip: str
    method: str
    target: str
    status: int
    size: int
    referer: str
    agent: str
    user: str = "-"

    def render(self) -> str:
        stamp = self.at.strftime("%d/%b/%Y:%H:%M:%S +0000")
        return (f'{self.ip} - {self.user} [{stamp}] "{self.method} {self.target} HTTP/1.1" '
                f'{self.status} {self.size} "{self.referer}" "{self.agent}"')


class AddressBook:
    """Public IPv4 addresses by country, found by locating random addresses offline."""

    def __init__(self, rng: random.Random, wanted: Sequence[str], per_country: int = 400):
        import iptocc

        self.rng = rng
        self.pool: dict[str, list[str]] = {c: [] for c in wanted}
        for _ in range(40):
            candidates = [f"{rng.randint(1, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}."
                          f"{rng.randint(1, 254)}" for _ in range(20_000)]
            for ip, cc in zip(candidates, iptocc.country_code(candidates), strict=True):
                if cc in self.pool and len(self.pool[cc]) < per_country:
                    self.pool[cc].append(ip)
            if all(len(v) >= per_country // 4 for v in self.pool.values()):
                break
        self.pool = {c: v for c, v in self.pool.items() if v}
        if not self.pool:
            raise UsageError("iptocc located no random address; is its data installed?")

    def draw(self, country: str | None = None) -> str:
        if country is None or country not in self.pool:
            country = self.rng.choice(sorted(self.pool))
        return self.rng.choice(self.pool[country])


class Shop:
    """The site map: pages, what links where, sizes, and how the server answers."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.sizes: dict[str, int] = {}

    def size(self, target: str) -> int:
        if target not in self.sizes:
            base = 400 if target.endswith((".ico", ".svg")) else 9_000
            if target.endswith(".jpg"):
                base = 60_000
            elif target.endswith(".js"):
                base = 80_000
            elif target.endswith(".css"):
                base = 25_000
            self.sizes[target] = int(base * self.rng.uniform(0.6, 1.6))
        return self.sizes[target] + self.rng.randint(-40, 40) * (not target.startswith("/static"))

    def landing(self) -> str:
        r = self.rng.random()
        if r < 0.35:
            return "/"
        if r < 0.6:
            return f"/category/{self.rng.choice(CATEGORIES)}"
        cat = self.rng.choice(CATEGORIES)
        return f"/product/{self.rng.choice(PRODUCTS[cat])}"

    def next_page(self, page: str, cart: bool) -> str | None:
        """The next page a visitor opens from ``page`` (None: they leave)."""
        r = self.rng.random()
        if r < 0.18:
            return None
        cat = self.rng.choice(CATEGORIES)
        if page.startswith("/product/"):
            if r < 0.38:
                return "/cart/add?sku=" + page.rsplit("/", 1)[1]
            if r < 0.7:
                return f"/product/{self.rng.choice(PRODUCTS[cat])}"
            return f"/category/{cat}"
        if page.startswith("/cart/add"):
            return "/cart" if r < 0.7 else f"/category/{cat}"
        if page == "/cart":
            return "/checkout" if r < 0.6 else f"/category/{cat}"
        if page == "/checkout":
            return "/login" if r < 0.5 else "/checkout/confirm"
        if page == "/login":
            return "/checkout/confirm"
        if r < 0.3:
            term = self.rng.choice(SEARCH_TERMS)
            return "/search?q=" + quote(term, safe="") + (f"&page={self.rng.randint(2, 4)}"
                                                         if self.rng.random() < 0.2 else "")
        if r < 0.75 or not cart:
            return f"/product/{self.rng.choice(PRODUCTS[cat])}"
        return "/cart"

    def assets(self, page: str) -> list[str]:
        out = list(PAGE_ASSETS)
        if page.startswith("/product/"):
            slug = page.rsplit("/", 1)[1]
            out += [f"/static/img/products/{slug}-{k}.jpg" for k in (1, 2)]
        elif page.startswith("/category/"):
            cat = page.rsplit("/", 1)[1]
            out += [f"/static/img/products/{p}-1.jpg" for p in PRODUCTS[cat][:6]]
        return out


class Simulator:
    def __init__(self, seed: int, start: datetime, hours: float):
        self.rng = random.Random(seed)
        self.start = start
        self.hours = hours
        self.shop = Shop(self.rng)
        self.book = AddressBook(self.rng, [c for c, _ in COUNTRIES])

    def _when(self) -> datetime:
        # busier afternoons and evenings: a mixture over a day (a span of a day or less: over
        # the span, as ever)
        span = self.hours * 3600.0
        if span <= DAY_S:
            return self.start + timedelta(seconds=self._time_of_day(span))
        # several days: a day of the span, then the time on it as on a one-day run. The mixture
        # was drawn once over the whole span, so three days were one bump (the middle day 3.5
        # times the first) with as many requests before noon as after
        days = math.ceil(span / DAY_S)
        while True:  # a time past the end of a last day cut short is drawn again
            t = self.rng.randrange(days) * DAY_S + self._time_of_day(DAY_S)
            if t < span:
                return self.start + timedelta(seconds=t)

    def _time_of_day(self, span: float) -> float:
        """Seconds into a ``span`` (a day, or less), afternoons and evenings the busiest."""
        return self.rng.random() * span if self.rng.random() < 0.5 else min(
            span - 1, abs(self.rng.gauss(0.62, 0.18)) * span)

    def _country(self) -> str:
        names = [c for c, _ in COUNTRIES]
        weights = [w for _, w in COUNTRIES]
        return self.rng.choices(names, weights=weights)[0]

    def visit(self) -> list[Line]:
        rng, shop = self.rng, self.shop
        ip = self.book.draw(self._country())
        agent = rng.choices([a for _, a in BROWSERS], weights=[w for w, _ in BROWSERS])[0]
        t = self._when()
        page: str | None = shop.landing()
        referer = rng.choice(REFERRERS) if rng.random() < 0.6 else "-"
        seen_assets: set[str] = set()
        lines: list[Line] = []
        cart = False
        for _ in range(rng.randint(2, 14)):
            if page is None:
                break
            method = "POST" if page in ("/login", "/checkout/confirm") or page.startswith(
                "/cart/add") else "GET"
            status = 200
            if page.startswith("/cart/add") or page == "/login":
                status = 302 if page.startswith("/cart/add") or rng.random() < 0.85 else 200
            elif rng.random() < 0.01:
                status = 404
            lines.append(Line(t, ip, method, page, status, shop.size(page), referer, agent))
            page_url = f"https://{SITE}{page}"
            for asset in shop.assets(page):
                t_asset = t + timedelta(milliseconds=rng.randint(30, 900))
                cached = asset in seen_assets and rng.random() < 0.8
                if asset in seen_assets and not cached:
                    continue  # served from the browser cache without asking
                seen_assets.add(asset)
                lines.append(Line(t_asset, ip, "GET", asset, 304 if cached else 200,
                                  0 if cached else shop.size(asset), page_url, agent))
            cart = cart or page.startswith("/cart/add")
            referer = page_url
            t += timedelta(seconds=rng.expovariate(1 / 25.0) + 2)
            page = shop.next_page(page, cart)
        return lines

    def crawl(self) -> list[Line]:
        rng = self.rng
        agent = rng.choice(CRAWLERS)
        ip = self.book.draw("US")
        t = self._when()
        lines = [Line(t, ip, "GET", "/robots.txt", 200, 180, "-", agent)]
        for _ in range(rng.randint(5, 25)):
            t += timedelta(seconds=rng.uniform(2, 30))
            cat = rng.choice(CATEGORIES)
            page = rng.choice([f"/category/{cat}", f"/product/{rng.choice(PRODUCTS[cat])}", "/"])
            lines.append(Line(t, ip, "GET", page, 200, self.shop.size(page), "-", agent))
        return lines

    # -- attacks ---------------------------------------------------------------------------
    def _attacker(self) -> tuple[str, str, datetime]:
        ip = self.book.draw()
        agent = self.rng.choices([a for _, a in BROWSERS], weights=[w for w, _ in BROWSERS])[0]
        return ip, agent, self._when()

    def _step(self, t: datetime, lo: float, hi: float) -> datetime:
        return t + timedelta(seconds=self.rng.uniform(lo, hi))

    def sqli(self, n: int) -> list[Line]:
        rng = self.rng
        ip, agent, t = self._attacker()
        if rng.random() < 0.5:
            agent = "sqlmap/1.8.4#stable (https://sqlmap.org)"
        payloads = ("1' OR '1'='1", "1 OR 1=1-- -", "1' UNION SELECT NULL,NULL,version()-- -",
                    "1 AND SLEEP(5)", "1'; DROP TABLE users--", "1) AND 1=CONVERT(int,@@version)--",
                    "-1 UNION ALL SELECT table_name FROM information_schema.tables",
                    "1' AND extractvalue(1,concat(0x7e,(SELECT user())))-- -")
        out = []
        for _ in range(n):
            cat = rng.choice(CATEGORIES)
            p = rng.choice(payloads).replace("1", str(rng.randint(1, 999)), 1)
            page = rng.choice([f"/product/{rng.choice(PRODUCTS[cat])}?id=",
                               "/search?q=", f"/category/{cat}?sort="])
            enc = quote(p, safe="") if rng.random() < 0.7 else quote(p, safe="'=(),")
            out.append(Line(t, ip, "GET", page + enc, rng.choice([500, 200, 200, 400]),
                            rng.randint(300, 9000), "-", agent))
            t = self._step(t, 0.2, 4)
        return out

    def xss(self, n: int) -> list[Line]:
        rng = self.rng
        ip, agent, t = self._attacker()
        payloads = ('<script>alert(1)</script>', '"><img src=x onerror=alert(document.cookie)>',
                    "<svg/onload=alert('xss')>", "javascript:alert(1)",
                    '"><iframe src=javascript:alert(1)>', "<body onload=alert(1)>")
        out = []
        for _ in range(n):
            p = rng.choice(payloads)
            page = rng.choice(["/search?q=", "/contact?message=", "/search?q=shoes&ref="])
            out.append(Line(t, ip, "GET", page + quote(p, safe=""), 200, rng.randint(4000, 9000),
                            f"https://{SITE}/", agent))
            t = self._step(t, 1, 8)
        return out

    def traversal(self, n: int) -> list[Line]:
        rng = self.rng
        ip, agent, t = self._attacker()
        targets = ("etc/passwd", "etc/shadow", "windows/win.ini", "proc/self/environ",
                   "var/www/.env", "boot.ini")
        out = []
        for _ in range(n):
            depth = rng.randint(3, 8)
            style = rng.choice(["../", "..%2f", "%2e%2e%2f", "....//", "..%252f"])
            tgt = style * depth + rng.choice(targets)
            page = rng.choice([f"/static/{tgt}", f"/download?file={tgt}", f"/image?path={tgt}"])
            out.append(Line(t, ip, "GET", page, rng.choice([400, 404, 403, 200]),
                            rng.randint(150, 600), "-", agent))
            t = self._step(t, 0.3, 3)
        return out

    def scanner(self, n: int) -> list[Line]:
        rng = self.rng
        ip, _agent, t = self._attacker()
        agent = rng.choice(["Mozilla/5.00 (Nikto/2.5.0) (Evasions:None) (Test:000562)",
                            "Mozilla/5.0 (compatible; Nmap Scripting Engine; https://nmap.org/book"
                            "/nse.html)"])
        words = ("admin", "wp-login.php", "phpmyadmin/", ".env", ".git/config", "backup.zip",
                 "config.php.bak", "server-status", "cgi-bin/test.cgi", "actuator/health",
                 "xmlrpc.php", "db.sql", "old/", "test.php", "console/", "vendor/phpunit/",
                 ".DS_Store", "api/v1/users", "shell.php", "web.config")
        out = []
        for _ in range(n):
            word = rng.choice(words)
            prefix = rng.choice(["", "", "static/", "cms/", "site/", f"{rng.randint(0, 99)}/"])
            status = 404 if rng.random() < 0.85 else rng.choice([403, 200, 301])
            method = "GET" if rng.random() < 0.85 else rng.choice(["HEAD", "OPTIONS", "PROPFIND"])
            out.append(Line(t, ip, method, "/" + prefix + word, status, rng.randint(150, 700),
                            "-", agent))
            t = self._step(t, 0.02, 0.4)
        return out

    def bruteforce(self, n: int) -> list[Line]:
        rng = self.rng
        ip, _agent, t = self._attacker()
        agent = rng.choice(["python-requests/2.31.0", "Mozilla/5.0 (Windows NT 10.0; Win64; x64) "
                            "AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 "
                            "Safari/537.36"])
        out = []
        for i in range(n):
            ok = i == n - 1 and rng.random() < 0.3
            out.append(Line(t, ip, "POST", "/login", 302 if ok else 401,
                            rng.randint(2900, 3100), f"https://{SITE}/login", agent))
            t = self._step(t, 0.1, 1.5)
        return out

    def flood(self, n: int) -> list[Line]:
        rng = self.rng
        ip, agent, t = self._attacker()
        page = rng.choice(["/", "/search?q=sale", f"/category/{rng.choice(CATEGORIES)}"])
        out = []
        for _ in range(n):
            status = 200 if rng.random() < 0.7 else rng.choice([429, 503])
            out.append(Line(t, ip, "GET", page, status, self.shop.size(page), "-", agent))
            t = self._step(t, 0.0, 0.05)
        return out


def simulate(out_dir: str | Path, visits: int = 2000, attacks: str | Sequence[str] = ATTACKS,
             attack_share: float = 0.05, seed: int = 0, start: datetime | None = None,
             hours: float = 24.0, log: Callable[[str], None] = lambda s: None
             ) -> dict[str, Path]:
    """Write ``normal.log`` and one log per attack label into ``out_dir``; returns label->path.

    ``attack_share`` is the share of attack lines relative to normal lines (split evenly
    across the attack kinds). Lines of each file are in time order.
    """
    if isinstance(attacks, str):  # one kind ("sqli"), not its letters ("unknown attack 's'")
        attacks = [attacks]
    attacks = list(dict.fromkeys(attacks))  # a kind named twice is one kind, not half a share
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise UsageError(f"unknown attack {unknown[0]!r}; choose from {', '.join(ATTACKS)}")
    if visits < 1:
        raise UsageError(f"visits (--visits) must be at least 1, not {visits}")
    if not 0.0 <= attack_share <= 1.0:
        raise UsageError("attack_share (--attack-share) must be between 0 and 1, "
                         f"not {attack_share}")
    if not 0 < hours <= 24 * 366:
        raise UsageError(f"hours (--hours) must be above 0 and at most a year (8,784), not {hours}")
    from .sinks import writable_dir

    out = writable_dir(out_dir, "--out")  # before the work, not after it
    start = start or datetime(2024, 5, 14, tzinfo=UTC)
    sim = Simulator(seed, start, hours)
    normal: list[Line] = []
    for _ in range(visits):
        normal.extend(sim.crawl() if sim.rng.random() < 0.04 else sim.visit())
    files: dict[str, list[Line]] = {"normal": normal}
    per_kind = int(len(normal) * attack_share / max(len(attacks), 1))
    for kind in attacks:
        lines: list[Line] = []
        make = getattr(sim, kind)
        while len(lines) < per_kind:
            burst = sim.rng.randint(20, 120) if kind != "flood" else sim.rng.randint(200, 600)
            lines.extend(make(min(burst, max(per_kind - len(lines), 1))))
        files[kind] = lines
    paths = {}
    for label, lines in files.items():
        lines.sort(key=lambda ln: ln.at)
        path = out / f"{label}.log"
        try:
            path.write_text("".join(ln.render() + "\n" for ln in lines))
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
        paths[label] = path
        log(f"{path}: {len(lines):,} lines ({label})")
    return paths
