"""Read back what a report page shows: its sections, images and example captions."""

from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser


@dataclass
class Page:
    """What the parser found."""

    sections: list[str] = field(default_factory=list)
    images: list[dict[str, str]] = field(default_factory=list)
    captions: dict[str, list[str]] = field(default_factory=dict)  # section title -> example captions
    scripts: list[str] = field(default_factory=list)
    external: list[str] = field(default_factory=list)  # src/href pointing outside the page


class _Parser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.page = Page()
        self._in: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "img":
            self.page.images.append(a)
        for name in ("src", "href"):
            if name in a and not a[name].startswith("data:"):
                self.page.external.append(a[name])
        if tag == "h2" or tag == "script" or (tag == "div" and a.get("class") == "cap"):
            self._in, self._text = (tag if tag != "div" else "cap"), []

    def handle_data(self, data: str) -> None:
        if self._in:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if self._in and tag in ("h2", "script", "div"):
            text = "".join(self._text)
            if self._in == "h2":
                self.page.sections.append(text)
                self.page.captions[text] = []
            elif self._in == "script":
                self.page.scripts.append(text)
            elif self.page.sections:
                self.page.captions[self.page.sections[-1]].append(text)
            self._in = None


def parse(html: str) -> Page:
    """Parse a report page."""
    parser = _Parser()
    parser.feed(html)
    parser.close()
    return parser.page
