#!/usr/bin/env python3
"""Write ktrelay(8) from README.md: the command table, the configuration rule, the exit codes, the
logging, metrics and every parameter table, so that the manual and the README never disagree.
Usage: mkman.py README.md ktrelay.8 VERSION"""
import re
import sys


def roff_text(s):
    s = s.replace("\\", "\\e")
    s = re.sub(r"\*\*([^*]+)\*\*", r"\\fB\1\\fR", s)
    s = re.sub(r"`([^`]+)`", r"\\fB\1\\fR", s)
    s = s.replace("\\e|", "|")
    lines = []
    for line in s.split("\n"):
        if line.startswith((".", "'")):
            line = "\\&" + line
        lines.append(line)
    return "\n".join(lines)


def sections(md):
    """(level, title, body) for each heading."""
    out = []
    cur = None
    for line in md.split("\n"):
        m = re.match(r"^(#{2,3}) (.*)$", line)
        if m:
            cur = [len(m.group(1)), m.group(2), []]
            out.append(cur)
        elif cur:
            cur[2].append(line)
    return [(lvl, title, "\n".join(body)) for lvl, title, body in out]


def table_rows(block):
    rows = []
    for line in block.split("\n"):
        if not line.startswith("|") or re.match(r"^\|\s*-", line) or re.match(r"^\|\s*-*:?\s*\|", line):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        rows.append([c.replace("\\|", "|") for c in cells])
    return rows


def render(block):
    """Paragraphs as .PP, tables as tagged paragraphs, code blocks as .nf."""
    out = []
    in_code = False
    para = []
    table = []

    def flush_para():
        if para:
            out.append(".PP\n" + roff_text(" ".join(para)))
            para.clear()

    def flush_table():
        if table:
            rows = table_rows("\n".join(table))
            for r in rows[1:]:
                tag = r[0]
                rest = "; ".join(x for x in r[1:] if x)
                out.append(".TP\n" + roff_text(tag) + "\n" + roff_text(rest))
            table.clear()

    for line in block.split("\n"):
        if line.startswith("```"):
            flush_para()
            flush_table()
            out.append(".PP\n.nf\n.RS" if not in_code else ".RE\n.fi")
            in_code = not in_code
            continue
        if in_code:
            out.append(roff_text(line) if line else "")
            continue
        if line.startswith("|"):
            flush_para()
            table.append(line)
            continue
        flush_table()
        if not line.strip():
            flush_para()
        else:
            para.append(line.strip())
    flush_para()
    flush_table()
    return "\n".join(out)


def main():
    src, dst, version = sys.argv[1], sys.argv[2], sys.argv[3]
    md = open(src, encoding="utf-8").read()
    secs = sections(md)
    want = ["Command line", "Configuration", "Parameters", "Relay and queue", "Outbound SMTP and TLS", "Metrics",
            "Logging", "AUTH"]
    parts = [
        '.TH KTRELAY 8 "" "ktrelay %s" "System Manager\'s Manual"' % version,
        ".SH NAME\nktrelay \\- SMTP server and relay with io_uring, kernel TLS and Postfix's configuration",
        ".SH SYNOPSIS\n.B ktrelay\n.I command\n[\\fB\\-c\\fR \\fIDIR\\fR] [\\fIoptions\\fR]\n.br\n"
        ".B sendmail\n[\\fIoptions\\fR] [\\fIrecipient\\fR ...]\n.br\n.B mailq\n.br\n.B newaliases",
        ".SH DESCRIPTION\n" + roff_text(
            "ktrelay reads Postfix's main.cf and master.cf with Postfix's parameter names and meanings, runs "
            "one io_uring event loop per core, does TLS handshakes in OpenSSL and hands record encryption to "
            "the kernel where it can, delivers durably into Maildir and relays through a durable queue. "
            "This page is generated from the README's command and parameter tables."),
    ]
    for lvl, title, body in secs:
        if title not in want:
            continue
        parts.append((".SH " if lvl == 2 else ".SS ") + roff_text(title.upper() if lvl == 2 else title))
        parts.append(render(body))
    parts.append(".SH FILES\n.TP\n/etc/ktrelay/main.cf, /etc/ktrelay/master.cf\nthe configuration (see "
                 "\\fBWhich configuration\\fR above)\n.TP\n\\&./ktrelay\\-data/\nthe embedded default")
    parts.append(".SH SEE ALSO\n.BR postconf (5),\n.BR master (5),\n.BR sendmail (1),\n.BR pflogsumm (1),\n"
                 ".BR systemd.service (5)")
    open(dst, "w", encoding="utf-8").write("\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
