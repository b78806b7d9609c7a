"""Characters of untrusted web text that must not reach a reader as they are.

* `strip_controls(text)`: for captions and titles at read time. C0 controls (except tab
  and newline; a carriage return counts as a newline) and C1 controls, DEL and the line /
  paragraph separators U+2028 / U+2029 become a space: an ESC, OSC or CSI sequence loses
  its introducer, so what is left is plain visible text. Bidirectional controls (the
  embeddings and overrides U+202A-U+202E, the isolates U+2066-U+2069, the marks U+200E /
  U+200F / U+061C) are removed: they reorder how a line is displayed (a "Trojan Source"
  caption shows other text than it holds).
* `printable(text)`: for a terminal. Every control, format, separator or surrogate
  character (Unicode categories Cc, Cf, Zl, Zp, Cs; tab and newline included) is shown as
  a Python-style escape (`\\x1b`, `\\u202e`, `\\U000e0041`), so nothing a data string holds
  can move the cursor, set a title, write the clipboard (OSC 52), make a link (OSC 8),
  reorder the line or start a new one.

No Apache Beam here: readers, the trainer and the terminal tools import it.
"""

from __future__ import annotations

import re
import unicodedata

BIDI_CONTROLS = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
# C0 (tab and newline kept), DEL, C1, and the Unicode line and paragraph separators.
_CONTROLS = re.compile("\r\n|[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
_BIDI = re.compile(f"[{BIDI_CONTROLS}]")
_ANY = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029{BIDI_CONTROLS}]")
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def _control(m: re.Match) -> str:
    return "\n" if m.group(0) in ("\r\n", "\r") else " "


def strip_controls(text: str) -> str:
    """`text` without C0 / C1 controls (each a space; tab and newline kept, CR or CRLF a
    newline) and without bidirectional controls (removed). Text without any comes back as
    the same object, so the common case costs one regex scan."""
    if not isinstance(text, str) or not _ANY.search(text):
        return text
    return _BIDI.sub("", _CONTROLS.sub(_control, text))


def _escape(ch: str) -> str:
    cp = ord(ch)
    if cp < 0x100:
        return f"\\x{cp:02x}"
    if cp < 0x10000:
        return f"\\u{cp:04x}"
    return f"\\U{cp:08x}"


def printable(text) -> str:
    """`text` (anything: it is str()-ed) for a terminal: every Cc, Cf, Zl, Zp or Cs
    character, tab and newline included, as a visible escape; other text unchanged."""
    text = text if isinstance(text, str) else str(text)
    if text.isprintable():
        # False for every Cc/Cf/Zl/Zp/Cs character (and for spaces other than U+0020 or
        # unassigned code points, which the slow path keeps as they are).
        return text
    return "".join(_escape(c) if unicodedata.category(c) in _ESCAPED_CATEGORIES else c for c in text)
