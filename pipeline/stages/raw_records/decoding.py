"""Bytes to text: BOMs, UTF-8, UTF-16, GB18030, decoded line by line where a file mixes them."""

from __future__ import annotations

from collections import Counter


class FileRejected(Exception):
    """The whole file cannot be used; the message says why."""


_BOMS = (
    (b"\x00\x00\xfe\xff", None, "UTF-32 (big-endian BOM)"),
    (b"\xff\xfe\x00\x00", None, "UTF-32 (little-endian BOM)"),
    (b"\xef\xbb\xbf", "utf-8", "utf-8-sig"),
    (b"\xff\xfe", "utf-16-le", "utf-16-le"),
    (b"\xfe\xff", "utf-16-be", "utf-16-be"),
)


def decode_lines(data: bytes) -> tuple[str, str, dict[int, str]]:
    """Decode a whole file: ``(text, encoding, {line_number: reason})``, or raise :class:`FileRejected`.

    Lines that are neither UTF-8 nor GB18030 become a marker line that the JSON parser rejects as
    a broken row, with the reason given here.
    """
    for bom, codec, label in _BOMS:
        if data.startswith(bom):
            if codec is None:
                raise FileRejected(f"encoded as {label}; supported are UTF-8, UTF-16 with BOM and GB18030")
            try:
                return data[len(bom) :].decode(codec), label, {}
            except UnicodeDecodeError as exc:
                raise FileRejected(
                    f"declares {label} by its byte-order mark but is not valid {label} (byte offset "
                    f"{exc.start + len(bom)}: {exc.reason})"
                ) from None
    head = data[:4096]
    nuls = head.count(0)
    if len(head) >= 4 and nuls > len(head) // 4:
        # JSON text never holds raw NUL bytes. UTF-16 without a BOM has them on one parity
        # (the high byte of ASCII characters); anything else is binary data.
        even = head[0::2].count(0)
        if max(even, nuls - even) >= 0.9 * nuls:
            raise FileRejected("looks like UTF-16 without a byte-order mark; save it as UTF-8 or UTF-16 with BOM")
        raise FileRejected(f"binary data, not text ({nuls} NUL bytes in the first {len(head)} bytes)")
    try:
        return data.decode("utf-8"), "utf-8", {}
    except UnicodeDecodeError as exc:
        first_error = exc
    # Not UTF-8 as a whole: decode line by line so that a file mixing UTF-8 and GB18030 keeps
    # both. ``\n`` (0x0A) never occurs inside a multi-byte GB18030 or UTF-8 sequence.
    lines = data.split(b"\n")
    out: list[str] = []
    used: Counter[str] = Counter()
    bad: dict[int, str] = {}
    for lineno, raw in enumerate(lines, start=1):
        try:
            out.append(raw.decode("utf-8"))
            if not raw.isascii():
                used["utf-8"] += 1
            continue
        except UnicodeDecodeError:
            pass
        try:
            out.append(raw.decode("gb18030"))
            used["gb18030"] += 1
        except UnicodeDecodeError as exc:
            bad[lineno] = f"line is neither UTF-8 nor GB18030 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
            out.append("\x00")  # never valid JSON: the parser rejects this line/element
    if not used["gb18030"]:
        raise FileRejected(
            f"not valid UTF-8 (byte offset {first_error.start}: {first_error.reason}) and not GB18030 either"
        )
    if len(bad) > max(1, len(lines) // 2):
        raise FileRejected(f"not text in a supported encoding ({len(bad)} of {len(lines)} lines undecodable)")
    encoding = "gb18030" if not used["utf-8"] else "mixed utf-8 + gb18030"
    return "\n".join(out), encoding, bad
