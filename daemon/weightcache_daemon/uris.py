"""Source URIs: the one place that turns what a caller typed into the URI the daemon uses.

Every entry (client ``Ensure``, admin ``Prefetch``, ``models.d`` files, resumed ingests)
calls ``normalize()`` before anything else looks at a URI; the ``client_sources``
allow-list, job keys, the index and the sources only ever see the canonical form.

The canonical form of a model URI is ``scheme://bucket/seg/seg/`` (``file:///seg/seg/``):

* the scheme is lower case, and only ``s3://`` and ``file://`` exist;
* the path is percent-decoded exactly once; a ``%``, ``?`` or ``#`` left after decoding
  (double encoding, or an encoded query or fragment) is refused, so decoding the
  canonical form again is a no-op and no later parser can see a different path;
* empty segments (``//``) and ``.`` segments are dropped; a ``..`` segment is refused
  (whether typed or encoded as ``%2e%2e``): it is never resolved, because the kernel
  resolves ``..`` after following links, and a string rule cannot know those;
* a query string or a fragment is refused: neither means anything for ``s3://`` or
  ``file://``, and accepting them would give one object several cache keys;
* control characters and backslashes are refused;
* it always ends with ``/`` (a model is a directory or a key prefix).

``allowed()`` matches ``client_sources`` globs against that form segment by segment:
``*``, ``?`` and ``[...]`` never match a ``/``; ``**`` matches any number of whole segments;
the single pattern ``*`` (the developer default) allows every URI.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

from weightcache.contract.errors import InvalidInputError

__all__ = ["SCHEMES", "allowed", "check_pattern", "normalize", "path_hint"]

SCHEMES = ("s3", "file")
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\%?#]")
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


def _segments(path: str, uri: str) -> list[str]:
    out = []
    for seg in path.split("/"):
        if seg in ("", "."):
            continue  # '//' and '/./' name the same place as '/'
        if seg == "..":
            raise InvalidInputError(f"source {uri[:300]!r}: a '..' path segment (typed or %-encoded) is not allowed")
        out.append(seg)
    return out


def normalize(uri: str) -> str:
    """The canonical form of a model URI, or InvalidInputError naming the rule it breaks."""
    if "://" not in uri:
        raise InvalidInputError(f"source {uri[:300]!r}: not a URI (expected s3://bucket/prefix/ or file:///dir/)")
    if re.search(r"[\x00-\x1f\x7f]", uri):
        raise InvalidInputError(f"source {uri[:300]!r}: control characters are not allowed in a URI")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise InvalidInputError(f"source {uri[:300]!r}: unsupported scheme {scheme!r} (supported: s3://, file://)")
    if parts.query or parts.fragment or "?" in uri or "#" in uri:
        raise InvalidInputError(
            f"source {uri[:300]!r}: query strings and fragments are not allowed ({scheme}:// URIs have none; "
            "a key that contains '?' or '#' is not supported)"
        )
    try:
        path = unquote(parts.path, errors="strict")
    except UnicodeDecodeError:
        raise InvalidInputError(f"source {uri[:300]!r}: %-encoded bytes that are not UTF-8") from None
    if _BAD_CHARS.search(path):
        raise InvalidInputError(
            f"source {uri[:300]!r}: after %-decoding, the path contains '%', '?', '#', a backslash or a control "
            "character (double encoding is not allowed)"
        )
    segs = _segments(path, uri)
    if scheme == "s3":
        bucket = parts.netloc
        if not bucket:
            raise InvalidInputError(f"source {uri[:300]!r}: missing bucket name")
        if not _BUCKET.fullmatch(bucket):
            raise InvalidInputError(
                f"source {uri[:300]!r}: bucket {bucket[:100]!r} may hold only letters, digits, '.', '_', '-' "
                "(no user, port or encoding)"
            )
        return f"s3://{bucket}/" + "".join(s + "/" for s in segs)
    if parts.netloc not in ("", "localhost"):
        raise InvalidInputError(f"source {uri[:300]!r}: file URIs must be local (file:///dir/)")
    if not parts.path.startswith("/"):
        raise InvalidInputError(f"source {uri[:300]!r}: file URIs need an absolute path")
    return "file:///" + "".join(s + "/" for s in segs)


def check_pattern(pattern: str, where: str) -> str:
    """A client_sources glob: '*' (everything), or scheme://... with no '..' segment."""
    if pattern in ("*", "**"):
        return pattern
    scheme, sep, rest = pattern.partition("://")
    if not sep or scheme not in SCHEMES:
        raise InvalidInputError(
            f"{where}: client_sources pattern {pattern!r} must start with s3:// or file:// (or be '*' for everything)"
        )
    if any(seg == ".." for seg in rest.split("/")) or "\\" in rest:
        raise InvalidInputError(f"{where}: client_sources pattern {pattern!r} has a '..' segment or a backslash")
    return pattern


def _match(segs: list[str], pats: list[str]) -> bool:
    if not pats:
        return not segs
    if pats[0] == "**":
        return any(_match(segs[i:], pats[1:]) for i in range(len(segs) + 1))
    return bool(segs) and fnmatch.fnmatchcase(segs[0], pats[0]) and _match(segs[1:], pats[1:])


def allowed(canonical: str, patterns: tuple[str, ...]) -> bool:
    """Whether a canonical URI matches one of the client_sources globs (see the module doc)."""
    scheme, _, rest = canonical.partition("://")
    segs = [s for s in rest.split("/") if s]
    if scheme == "file":
        segs = ["", *segs]  # the empty host of file:///
    for pattern in patterns:
        if pattern in ("*", "**"):
            return True
        pscheme, _, prest = pattern.partition("://")
        if pscheme != scheme:
            continue
        pats = [p for p in prest.split("/") if p]
        if scheme == "file":
            pats = ["", *pats]
        if _match(segs, pats):
            return True
    return False


def path_hint(reference: str, may_fetch: Callable[[str], bool] | None, allow_list: str = "the daemon's") -> str:
    """What to add to "model X is not in the cache" when X is a filesystem path: the URI that
    names that directory, and whether this caller may fetch it. '' for anything else.
    `may_fetch(canonical)`: whether the caller may trigger that download (None: it may);
    `allow_list`: whose client_sources said no ("the daemon's", "tenant team-a's")."""
    if reference.startswith("/"):
        try:
            uri = normalize("file://" + reference)
        except InvalidInputError:
            return ""
        if may_fetch is None or may_fetch(uri):
            return f"; a directory is opened by its URI, {uri}, which this caller may fetch"
        return (
            f"; a directory is opened by its URI, {uri}, which this client may not fetch (not in {allow_list} "
            f"client_sources allow-list): an admin can run cachectl prefetch {uri} --name NAME, then open NAME"
        )
    if reference.startswith(("./", "../", "~")) or reference in (".", ".."):
        return (
            "; this looks like a relative path, which means nothing to the daemon: open a directory by its "
            "absolute URI, file:///ABSOLUTE/PATH/"
        )
    return ""
