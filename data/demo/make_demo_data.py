#!/usr/bin/env python3
"""Generate the llm-refinery demo data set from documentation shipped with CPython.

Sources (nothing is downloaded):

* ``pydoc_data.topics.topics`` -- the Python language-reference sections that
  ``help()`` uses (topic name -> plain text);
* docstrings of public functions, classes and methods of a fixed list of
  standard-library modules (``MODULES`` below), read with ``inspect.getdoc``.

Run from the repository root::

    python data/demo/make_demo_data.py

The files are written next to this script (``data/demo/``).  The output is
deterministic: the same CPython version produces byte-identical files (fixed
seed, sorted iteration everywhere, ``json.dumps(..., ensure_ascii=False,
sort_keys=True)``, one object per line, ``\\n`` line endings).  Standard
library only.  See README.md in this folder for the schemas.
"""

from __future__ import annotations

import builtins
import importlib
import inspect
import json
import random
import re
import sys
import warnings
from pathlib import Path

SEED = 1234
OUT_DIR = Path(__file__).resolve().parent

# (name shown in prompts/answers, module to import, extra __module__ values that
# count as "defined by" this module).  Besides the module itself, objects whose
# __module__ is a submodule of it (json.encoder for json) or its C accelerator
# ("_" + last name component: _heapq for heapq) count as defined by it.
MODULES: list[tuple[str, str, tuple[str, ...]]] = [
    ("argparse", "argparse", ()),
    ("ast", "ast", ()),
    ("asyncio", "asyncio", ()),
    ("base64", "base64", ()),
    ("bisect", "bisect", ()),
    ("calendar", "calendar", ()),
    ("codecs", "codecs", ()),
    ("collections", "collections", ()),
    ("concurrent.futures", "concurrent.futures", ()),
    ("configparser", "configparser", ()),
    ("contextlib", "contextlib", ()),
    ("copy", "copy", ()),
    ("csv", "csv", ()),
    ("dataclasses", "dataclasses", ()),
    ("datetime", "datetime", ()),
    ("decimal", "decimal", ()),
    ("difflib", "difflib", ()),
    ("doctest", "doctest", ()),
    ("email.message", "email.message", ()),
    ("email.utils", "email.utils", ()),
    ("enum", "enum", ()),
    ("fnmatch", "fnmatch", ()),
    ("fractions", "fractions", ()),
    ("functools", "functools", ()),
    ("getopt", "getopt", ()),
    ("gettext", "gettext", ()),
    ("glob", "glob", ()),
    ("gzip", "gzip", ()),
    ("hashlib", "hashlib", ()),
    ("heapq", "heapq", ()),
    ("hmac", "hmac", ()),
    ("html", "html", ()),
    ("http.cookies", "http.cookies", ()),
    ("inspect", "inspect", ()),
    ("ipaddress", "ipaddress", ()),
    ("itertools", "itertools", ()),
    ("json", "json", ()),
    ("locale", "locale", ()),
    ("logging", "logging", ()),
    ("mimetypes", "mimetypes", ()),
    ("operator", "operator", ()),
    # os.path is imported as posixpath (the same on every platform); the
    # helpers it re-exports from genericpath (exists, getsize, ...) count too.
    ("os.path", "posixpath", ("genericpath",)),
    ("pathlib", "pathlib", ()),
    ("pickle", "pickle", ()),
    ("pprint", "pprint", ()),
    ("queue", "queue", ()),
    ("random", "random", ()),
    ("re", "re", ()),
    ("sched", "sched", ()),
    ("secrets", "secrets", ()),
    ("shlex", "shlex", ()),
    ("shutil", "shutil", ()),
    ("smtplib", "smtplib", ()),
    ("sqlite3", "sqlite3", ()),
    ("statistics", "statistics", ()),
    ("string", "string", ()),
    ("struct", "struct", ()),
    ("subprocess", "subprocess", ()),
    ("tarfile", "tarfile", ()),
    ("tempfile", "tempfile", ()),
    ("textwrap", "textwrap", ()),
    ("threading", "threading", ()),
    ("timeit", "timeit", ()),
    ("tokenize", "tokenize", ()),
    ("trace", "trace", ()),
    ("traceback", "traceback", ()),
    ("typing", "typing", ()),
    ("unicodedata", "unicodedata", ()),
    ("unittest", "unittest", ()),
    ("urllib.parse", "urllib.parse", ()),
    ("uuid", "uuid", ()),
    ("xml.etree.ElementTree", "xml.etree.ElementTree", ()),
    ("zipfile", "zipfile", ()),
    ("zlib", "zlib", ()),
]

# Attributes that are not real API objects (deprecated pseudo-namespaces).
EXCLUDED = {"typing.io", "typing.re"}

# Modules that are NOT part of the data but whose public function/class names
# make a "which module defines X?" question ambiguous (e.g. os.chown vs
# shutil.chown, time.sleep vs asyncio.sleep).  Imported only to read their names.
AMBIGUITY_MODULES = [
    "abc", "array", "bz2", "cmath", "code", "codeop", "copyreg", "email",
    "errno", "html.parser", "http.client", "importlib", "io", "keyword", "lzma",
    "marshal", "math", "multiprocessing", "numbers", "os", "pkgutil",
    "platform", "runpy", "select", "signal", "socket", "stat", "sys",
    "sysconfig", "time", "token", "types", "urllib.request", "warnings",
    "weakref",
]

# Hard negatives for the preference pairs. A reward model that only ever saw "a wrong stdlib module" and
# "another object's summary" as rejected answers scores anything else highly: the first measured PPO run
# learned to answer every which_module prompt with "pandas" (RM score 3.0 against 0.5 for a right
# stdlib answer). A share of the rejected answers are therefore the failure modes a policy finds:
# non-stdlib packages, prose instead of a name, the object's own name; vague and cut-off summaries.
HARD_NEGATIVE_SEED = 5678
HARD_NEGATIVE_SHARE = 0.5
HARD_WHICH_MODULE_SHARE = 0.3  # the rest are wrong stdlib modules, so every module is rejected about 0.7x as often as chosen
NOT_STDLIB = ["numpy", "pandas", "requests", "scipy", "django", "flask", "matplotlib", "pygame", "pytest",
              "torch", "sklearn", "yaml", "attrs", "six", "click", "jinja2", "sqlalchemy", "boto3",
              "PyPy", "Python", "python", "stdlib", "builtins.py", "pip", "setuptools"]
PROSE_ANSWERS = ["Python.", "Python's standard-library module.", "The standard library.",
                 "It is defined in the standard library.", "I don't know.", "The {name} {kind}.",
                 "The module that defines {name}.", "{name} is part of the Python standard library."]
VAGUE_SUMMARIES = ["Do something.", "This is a function.", "A class.", "A method.", "Return the result.",
                   "It does what the documentation says.", "See the documentation.", "Python.",
                   "This {kind} is part of the standard library.", "Handle {name}."]


def hard_which_module_negative(rng: random.Random, e: "Entry") -> str:
    """A rejected answer to "which module defines X": a non-stdlib package, prose, or X's own name."""
    kind = rng.randrange(3)
    if kind == 0:
        return rng.choice(NOT_STDLIB)
    if kind == 1:
        return rng.choice(PROSE_ANSWERS).format(name=e.name, kind=e.kind)
    return e.name.rpartition(".")[2]


def hard_summary_negative(rng: random.Random, e: "Entry", truth: str, other: str) -> str | None:
    """A rejected summary: a vague sentence, the true summary cut to its first two or three words (None when
    the summary is too short to cut), or the true summary padded with another object's summary. Cut-off
    negatives alone taught the reward model "longer is better" (the first PPO run on them grew its summaries
    from 6 to 9 words and drifted off the reference); padded ones make length on its own no signal."""
    kind = rng.randrange(3)
    if kind == 0:
        return rng.choice(VAGUE_SUMMARIES).format(name=e.name.rpartition(".")[2], kind=e.kind)
    if kind == 2:
        return f"{truth.rstrip('.')}. {other}"
    words = truth.rstrip(".").split()
    if len(words) < 5:
        return None
    return " ".join(words[:rng.choice((2, 3))]) + "."


# Sizes.
N_PROMPTS = {"which_module": 50, "summarize": 50}
N_PREFS = {"which_module": 200, "summarize": 200}
N_SFT = {"which_module": 300, "summarize": 300}
CORPUS_TARGET_BYTES = 1_250_000

MIN_DOC_CHARS = 40
MIN_BODY_CHARS = 60
SUMMARY_MIN, SUMMARY_MAX = 20, 200
MAX_PROMPT_CHARS = 1200
TOPIC_PARA_MIN, TOPIC_PARA_MAX = 40, 600
TRUNCATION_MARK = "[...]"

SUMMARIZE_TMPL = "Summarize in one sentence what the {kind} `{qualname}` does, given its documentation:\n\n"
WHICH_MODULE_TMPL = ("Which Python standard-library module defines the {kind} `{name}`? "
                     "Answer with the module name only.")
EXPLAIN_TMPL = "Explain the Python language topic \"{title}\" briefly."


# --------------------------------------------------------------------------- #
# text helpers
# --------------------------------------------------------------------------- #

_ADDRESS_RE = re.compile(r" at 0x[0-9A-Fa-f]+")
# A leading paragraph that is only a call signature ("pack(fmt, v1, ...) -> bytes")
# or a list of keyword defaults ("m=None, name=None, ...", doctest.testmod).
_SIGNATURE_RE = re.compile(r"[A-Za-z_][\w.]*\(.*\)(\s*-+>.*)?|\w+=\S+?(,\s*\w+=\S+?)*,?", re.S)


def normalise(text: str) -> str:
    """Strip line-end whitespace, drop outer blank lines, squeeze blank runs."""
    text = _ADDRESS_RE.sub("", text.expandtabs(8))
    out: list[str] = []
    for line in text.splitlines():
        line = line.rstrip()
        if not line and (not out or not out[-1]):
            continue
        out.append(line)
    while out and not out[-1]:
        out.pop()
    return "\n".join(out)


def one_line(text: str) -> str:
    return " ".join(text.split())


def sentences(text: str) -> list[str]:
    return re.split(r"(?<=[.!?])\s+(?=[A-Z\"“(*`'])", text)


def first_sentence(text: str) -> str:
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    return m.group(1) if m else text


def drop_lead_in(text: str) -> str:
    """'Compare x. Return a value:' -> 'Compare x.'; 'Do y, e.g.:' -> 'Do y.'

    A trailing colon introduces a list or an example that is not part of the
    text, so the sentence that ends with it is dropped (or closed with a full
    stop when it is the only one).
    """
    if not text.endswith(":"):
        return text
    parts = sentences(text)
    if len(parts) > 1:
        return " ".join(parts[:-1])
    text = re.sub(r"(,?\s*(e\.g\.|i\.e\.|for example|as follows))?\s*:$", "", text)
    return text.rstrip(" ,;") + "."


# --------------------------------------------------------------------------- #
# docstring harvesting
# --------------------------------------------------------------------------- #

class Entry:
    """One documented object: a module-level function/class or a method."""

    __slots__ = ("module", "name", "qualname", "kind", "doc", "toplevel")

    def __init__(self, module, name, qualname, kind, doc, toplevel):
        self.module = module      # display module name, e.g. "os.path"
        self.name = name          # attribute name, e.g. "join" / "JSONEncoder.encode"
        self.qualname = qualname  # module + "." + name
        self.kind = kind          # "function" | "class" | "method"
        self.doc = doc            # normalised docstring
        self.toplevel = toplevel  # module-level object (usable for which_module)


def owned_by(obj, import_name: str, extras: tuple[str, ...]) -> bool:
    origin = getattr(obj, "__module__", None)
    if not isinstance(origin, str):
        return False
    accel = "_" + import_name.rsplit(".", 1)[-1]
    return (origin == import_name or origin.startswith(import_name + ".")
            or origin == accel or origin in extras)


def own_doc(obj) -> str | None:
    """The object's own docstring (not one inherited via inspect.getdoc)."""
    raw = getattr(obj, "__doc__", None)
    if not isinstance(raw, str):
        return None
    doc = inspect.getdoc(obj)
    if not isinstance(doc, str):
        return None
    doc = normalise(doc)
    return doc if len(doc) >= MIN_DOC_CHARS else None


def kind_of(obj) -> str:
    return "class" if inspect.isclass(obj) else "function"


def import_quietly(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(name)


def public_attr(mod, name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(mod, name, None)


def harvest():
    """Return (module docs, entries, defined-names map) for MODULES."""
    module_docs: list[tuple[str, str]] = []
    entries: list[Entry] = []
    defined_in: dict[str, list[str]] = {}  # name -> display modules defining it
    for display, import_name, extras in sorted(MODULES):
        mod = import_quietly(import_name)
        mdoc = own_doc(mod)
        if mdoc:
            module_docs.append((display, mdoc))
        for name in sorted(dir(mod)):
            if name.startswith("_") or f"{display}.{name}" in EXCLUDED:
                continue
            obj = public_attr(mod, name)
            if not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            if not owned_by(obj, import_name, extras):
                continue
            defined_in.setdefault(name, []).append(display)
            doc = own_doc(obj)
            if doc:
                entries.append(Entry(display, name, f"{display}.{name}", kind_of(obj), doc, True))
            if not inspect.isclass(obj):
                continue
            for mname in sorted(vars(obj)):
                if mname.startswith("_"):
                    continue
                member = vars(obj)[mname]
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if not inspect.isroutine(member):
                    continue
                if inspect.isfunction(member) and not owned_by(member, import_name, extras):
                    continue
                mdoc = own_doc(member)
                if mdoc:
                    entries.append(Entry(display, f"{name}.{mname}", f"{display}.{name}.{mname}",
                                         "method", mdoc, False))
    # Drop duplicated docstrings (aliases such as random.randint and
    # random.Random.randint): keep module-level objects first, then by name.
    entries.sort(key=lambda e: (not e.toplevel, e.qualname))
    seen: set[str] = set()
    unique: list[Entry] = []
    for e in entries:
        if e.doc in seen:
            continue
        seen.add(e.doc)
        unique.append(e)
    unique.sort(key=lambda e: e.qualname)
    return module_docs, unique, defined_in


def ambiguous_names(defined_in: dict[str, list[str]]) -> set[str]:
    names = {n for n, mods in defined_in.items() if len(mods) > 1}
    names.update(n for n in dir(builtins) if not n.startswith("_"))
    for modname in sorted(AMBIGUITY_MODULES):
        mod = import_quietly(modname)
        for n in sorted(dir(mod)):
            if n.startswith("_"):
                continue
            obj = public_attr(mod, n)
            if inspect.isclass(obj) or inspect.isroutine(obj):
                names.add(n)
    return names


def split_summary(doc: str) -> tuple[str, str] | None:
    """(summary line, body) of a docstring, or None if it does not qualify."""
    paras = doc.split("\n\n")
    while paras and _SIGNATURE_RE.fullmatch(paras[0].strip()):
        paras.pop(0)
    if len(paras) < 2:
        return None
    summary = drop_lead_in(one_line(paras[0]))
    if len(summary) > SUMMARY_MAX:
        summary = first_sentence(summary)
    if not SUMMARY_MIN <= len(summary) <= SUMMARY_MAX:
        return None
    body = "\n\n".join(paras[1:]).strip("\n")
    if len(one_line(body)) < MIN_BODY_CHARS:
        return None
    return summary, body


def summarize_prompt(e: Entry, body: str) -> str | None:
    header = SUMMARIZE_TMPL.format(kind=e.kind, qualname=e.qualname)
    room = MAX_PROMPT_CHARS - len(header)
    if len(body) > room:
        kept: list[str] = []
        size = 0
        for line in body.split("\n"):
            if size + len(line) + 1 + len(TRUNCATION_MARK) > room:
                break
            kept.append(line)
            size += len(line) + 1
        while kept and not kept[-1]:
            kept.pop()
        if len(one_line("\n".join(kept))) < MIN_BODY_CHARS:
            return None
        body = "\n".join(kept) + "\n" + TRUNCATION_MARK
    return header + body


# --------------------------------------------------------------------------- #
# language-reference topics
# --------------------------------------------------------------------------- #

_HEADING_LEVEL = {"*": 1, "=": 2, "-": 3, "~": 4}
_SKIP_PARA_PREFIXES = ("New in version", "Changed in version", "Deprecated since",
                       "**Source code:**", "See also:", "Note:", "Warning:")


def topic_sections(key: str, text: str):
    """Yield (level, title, parent title or None, body) for each heading."""
    lines = text.split("\n")
    heads = []  # (line index, level, title)
    for i in range(len(lines) - 1):
        t, u = lines[i], lines[i + 1]
        if (t.strip() and u and len(u) == len(t) and len(set(u)) == 1
                and u[0] in _HEADING_LEVEL and not t.startswith(" ")):
            heads.append((i, _HEADING_LEVEL[u[0]], t.strip()))
    for n, (i, level, title) in enumerate(heads):
        end = heads[n + 1][0] if n + 1 < len(heads) else len(lines)
        parent = None
        for _, plevel, ptitle in reversed(heads[:n]):
            if plevel < level:
                parent = ptitle
                break
        yield level, title, parent, "\n".join(lines[i + 2:end])


def readable_title(title: str) -> str:
    # 'The "assert" statement' -> 'The `assert` statement'
    return re.sub(r'"([^"]+)"', r"`\1`", title).replace("*", "")


_LIST_ITEM_RE = re.compile(r"([*\-]|\d+\.) ")
# Sentences that only announce a grammar block, a list or an example.
_PURE_LEAD_IN_RE = re.compile(
    r"(syntax|the syntax is|the syntax for .*|the top-level syntax .*"
    r"|.*described by the following lexical definitions|.*the following code .*"
    r"|.*as follows|.*for example|.*defined with|.*in two steps):", re.I)


def prose_paragraphs(body: str) -> list[str]:
    """Unindented prose paragraphs of a section, each flattened to one line."""
    out = []
    for para in re.split(r"\n[ \t]*\n", body):
        para = para.strip("\n")
        if not para.strip() or para.startswith((" ", "\t")):
            continue  # grammar productions, code, indented notes and tables
        flat = one_line(para)
        if flat.startswith(_SKIP_PARA_PREFIXES) or _LIST_ITEM_RE.match(flat):
            continue
        if not re.search(r"[A-Za-z]", flat) or re.fullmatch(r"[=\-*~^]+", flat):
            continue
        out.append(flat)
    return out


def topic_answer(body: str) -> str | None:
    """First prose paragraph of a section, cleaned, 40-600 characters.

    A trailing sentence that only announces a grammar block or example
    ("Syntax:", "... described by the following lexical definitions:") is
    dropped; a short paragraph that is nothing but such an announcement is
    skipped in favour of the next one.  Any other trailing colon becomes a full stop.
    Text over the limit is cut back to whole sentences.
    """
    text = None
    for para in prose_paragraphs(body):
        if para.endswith(":"):
            parts = sentences(para)
            if _PURE_LEAD_IN_RE.fullmatch(parts[-1]) and (len(parts) > 1 or len(para) < 100):
                parts = parts[:-1]
                if not parts:
                    continue
                para = " ".join(parts)
            else:
                para = para[:-1].rstrip() + "."
        text = para
        break
    if text is None:
        return None
    if len(text) > TOPIC_PARA_MAX:
        acc = ""
        for sent in sentences(text):
            cand = (acc + " " + sent).strip()
            if len(cand) > TOPIC_PARA_MAX:
                break
            acc = cand
        text = acc
    text = drop_lead_in(text)
    return text if len(text) >= TOPIC_PARA_MIN else None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def build_explain_topics(topics: dict[str, str]) -> list[dict]:
    sections = []
    for key in sorted(topics):
        for pos, (level, title, parent, body) in enumerate(topic_sections(key, topics[key])):
            sections.append((level, key, pos, title, parent, body))
    sections.sort(key=lambda s: (s[0], s[1], s[2]))  # top-level headings first
    seen_titles: set[str] = set()
    seen_answers: set[str] = set()
    out = []
    for level, key, pos, title, parent, body in sections:
        shown = readable_title(title)
        if level > 1 and parent:
            shown = f"{shown} ({readable_title(parent)})"
        answer = topic_answer(body)
        if not answer or shown.lower() in seen_titles or answer in seen_answers:
            continue
        seen_titles.add(shown.lower())
        seen_answers.add(answer)
        out.append({
            "id": f"explain_topic:{key}#{slug(shown)}",
            "prompt": EXPLAIN_TMPL.format(title=shown),
            "response": answer,
        })
    out.sort(key=lambda r: r["id"])
    return out


# --------------------------------------------------------------------------- #
# assembling the files
# --------------------------------------------------------------------------- #

def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")


def main() -> None:
    if sys.version_info[:2] != (3, 11):
        print(f"note: the committed files were generated with CPython 3.11.7; "
              f"this is {sys.version.split()[0]}, so the output may differ", file=sys.stderr)
    rng = random.Random(SEED)
    from pydoc_data.topics import topics

    module_docs, entries, defined_in = harvest()
    ambiguous = ambiguous_names(defined_in)

    # Eligibility of every documented object for the two function-level tasks.
    # Objects whose summary lines are identical (queue.Queue.put and
    # asyncio.Queue.put) would leak answers across splits: keep the first.
    summ_data: dict[str, tuple[str, str]] = {}  # qualname -> (prompt, summary)
    seen_summaries: set[str] = set()
    for e in entries:
        split = split_summary(e.doc)
        if split and split[0] not in seen_summaries:
            prompt = summarize_prompt(e, split[1])
            if prompt:
                seen_summaries.add(split[0])
                summ_data[e.qualname] = (prompt, split[0])
    wm_ok = {e.qualname for e in entries
             if e.toplevel and e.name not in ambiguous and len(defined_in.get(e.name, ())) == 1}

    # Deterministic split of the pool of objects: every object feeds at most
    # one item of one file.  Held-out prompts are drawn first, then
    # preferences, then SFT; the two tasks take turns.  Each task first takes
    # objects that only it can use (which_module: module-level objects whose
    # docstring has no usable summary/body split; summarize: methods and
    # objects with ambiguous names), and only then objects both could use.
    order = list(entries)
    rng.shuffle(order)
    eligible = {"which_module": wm_ok, "summarize": set(summ_data)}
    preference = {
        "which_module": [e for e in order if e.qualname in wm_ok and e.qualname not in summ_data]
                        + [e for e in order if e.qualname in wm_ok and e.qualname in summ_data],
        "summarize": [e for e in order if e.qualname in summ_data and e.qualname not in wm_ok]
                     + [e for e in order if e.qualname in summ_data and e.qualname in wm_ok],
    }
    used: set[str] = set()
    buckets: dict[tuple[str, str], list[Entry]] = {}
    for stage, sizes in (("prompts", N_PROMPTS), ("preferences", N_PREFS), ("sft", N_SFT)):
        for task in sizes:
            buckets[(stage, task)] = []
        progress = True
        while progress:
            progress = False
            for task in ("which_module", "summarize"):
                if len(buckets[(stage, task)]) >= sizes[task]:
                    continue
                for e in preference[task]:
                    if e.qualname not in used:
                        assert e.qualname in eligible[task]
                        used.add(e.qualname)
                        buckets[(stage, task)].append(e)
                        progress = True
                        break

    def wm_prompt(e: Entry) -> str:
        return WHICH_MODULE_TMPL.format(kind=e.kind, name=e.name)

    # ---- sft ------------------------------------------------------------- #
    sft_summ = [{"id": f"summarize:{e.qualname}", "prompt": summ_data[e.qualname][0],
                 "response": summ_data[e.qualname][1]} for e in buckets[("sft", "summarize")]]
    sft_wm = [{"id": f"which_module:{e.qualname}", "prompt": wm_prompt(e), "response": e.module}
              for e in buckets[("sft", "which_module")]]
    explain = build_explain_topics(topics)
    rng.shuffle(explain)

    # ---- preferences ----------------------------------------------------- #
    module_names = sorted(d for d, _, _ in MODULES)
    # Hard negatives come from their own generator so that adding them left every other file
    # byte-identical (the main rng's draws are unchanged).
    hard_rng = random.Random(HARD_NEGATIVE_SEED)
    prefs = []
    # a wrong module is drawn with the frequency modules have as right answers in this file (not uniformly
    # over the 74): a module that is often right and never wrong (codecs: 7 to 0) taught the reward model a
    # prior for it, and PPO then answered "codecs" to every which_module prompt
    chosen_modules = [e.module for e in buckets[("preferences", "which_module")]]
    for e in buckets[("preferences", "which_module")]:
        rng.choice([m for m in module_names if m != e.module])  # keeps the main generator's draws (other files)
        wrong = hard_rng.choice([m for m in chosen_modules if m != e.module])
        if hard_rng.random() < HARD_WHICH_MODULE_SHARE:
            wrong = hard_which_module_negative(hard_rng, e)
        prefs.append({"id": f"pref:which_module:{e.qualname}", "prompt": wm_prompt(e),
                      "chosen": e.module, "rejected": wrong, "task": "which_module"})
    pref_summ = buckets[("preferences", "summarize")]
    for e in pref_summ:
        truth = summ_data[e.qualname][1]
        others = [o for o in pref_summ
                  if o.module != e.module and summ_data[o.qualname][1] != truth]
        same_kind = [o for o in others if o.kind == e.kind]
        distractor = rng.choice(same_kind or others)
        rejected = summ_data[distractor.qualname][1]
        if hard_rng.random() < HARD_NEGATIVE_SHARE:
            rejected = hard_summary_negative(hard_rng, e, truth, rejected) or rejected
        prefs.append({"id": f"pref:summarize:{e.qualname}", "prompt": summ_data[e.qualname][0],
                      "chosen": truth, "rejected": rejected, "task": "summarize"})
    rng.shuffle(prefs)

    # ---- held-out prompts -------------------------------------------------- #
    held = []
    for e in buckets[("prompts", "which_module")]:
        held.append({"id": f"prompt:which_module:{e.qualname}", "prompt": wm_prompt(e),
                     "reference": e.module, "task": "which_module"})
    for e in buckets[("prompts", "summarize")]:
        held.append({"id": f"prompt:summarize:{e.qualname}", "prompt": summ_data[e.qualname][0],
                     "reference": summ_data[e.qualname][1], "task": "summarize"})
    rng.shuffle(held)

    # ---- corpus ------------------------------------------------------------ #
    held_out = {e.qualname for k, v in buckets.items() if k[0] == "prompts" for e in v}
    corpus = []
    for key in sorted(topics):
        corpus.append({"id": f"corpus:pydoc_topics:{key}", "source": f"pydoc_topics:{key}",
                       "text": normalise(topics[key])})
    for display, mdoc in module_docs:
        corpus.append({"id": f"corpus:docstring:{display}", "source": f"docstring:{display}",
                       "text": f"Help on module {display}:\n\n{mdoc}"})

    def size(rec: dict) -> int:
        return len(json.dumps(rec, ensure_ascii=False, sort_keys=True).encode("utf-8")) + 1

    total = sum(size(r) for r in corpus)
    candidates = [e for e in entries if e.qualname not in held_out]
    rng.shuffle(candidates)
    sampled = []
    for e in candidates:
        owner, _, attr = e.name.rpartition(".")
        where = f"class {owner} in module {e.module}" if owner else f"module {e.module}"
        what = "method" if e.kind == "method" else e.kind
        rec = {"id": f"corpus:docstring:{e.qualname}", "source": f"docstring:{e.qualname}",
               "text": f"Help on {what} {attr} in {where}:\n\n{e.doc}"}
        if total + size(rec) > CORPUS_TARGET_BYTES:
            continue
        total += size(rec)
        sampled.append(rec)
    sampled.sort(key=lambda r: r["id"])
    corpus.extend(sampled)

    files = {
        "corpus.jsonl": corpus,
        "sft/summarize.jsonl": sft_summ,
        "sft/which_module.jsonl": sft_wm,
        "sft/explain_topic.jsonl": explain,
        "preferences.jsonl": prefs,
        "prompts.jsonl": held,
    }

    # ---- self-check ---------------------------------------------------------- #
    schemas = {
        "corpus.jsonl": {"id", "source", "text"},
        "sft/summarize.jsonl": {"id", "prompt", "response"},
        "sft/which_module.jsonl": {"id", "prompt", "response"},
        "sft/explain_topic.jsonl": {"id", "prompt", "response"},
        "preferences.jsonl": {"id", "prompt", "chosen", "rejected", "task"},
        "prompts.jsonl": {"id", "prompt", "reference", "task"},
    }
    for name, recs in files.items():
        ids = [r["id"] for r in recs]
        assert len(ids) == len(set(ids)), f"{name}: duplicate ids"
        for r in recs:
            assert set(r) == schemas[name], f"{name}: bad keys {sorted(r)}"
            for k, v in r.items():
                assert isinstance(v, str) and v.strip(), f"{name}: empty {k} in {r['id']}"
    for r in prefs:
        assert r["chosen"] != r["rejected"], r["id"]
    train_prompts = {r["prompt"] for n, recs in files.items() if n != "prompts.jsonl"
                     and n != "corpus.jsonl" for r in recs}
    leaked = [r["id"] for r in held if r["prompt"] in train_prompts]
    assert not leaked, f"held-out prompts found in training files: {leaked[:5]}"
    train_summaries = ({r["response"] for r in sft_summ}
                       | {r[k] for r in prefs if r["task"] == "summarize" for k in ("chosen", "rejected")})
    leaked = [r["id"] for r in held if r["task"] == "summarize" and r["reference"] in train_summaries]
    assert not leaked, f"held-out summaries found in training files: {leaked[:5]}"
    sources: dict[str, str] = {}  # object -> file: every object feeds one file only
    for n in ("sft/summarize.jsonl", "sft/which_module.jsonl", "preferences.jsonl", "prompts.jsonl"):
        for r in files[n]:
            obj = r["id"].rsplit(":", 1)[1]
            assert sources.setdefault(obj, n) == n, f"{obj} used in {sources[obj]} and {n}"
    corpus_objs = {r["source"].split(":", 1)[1] for r in corpus}
    assert not held_out & corpus_objs, "held-out objects in corpus"
    for n in ("sft/summarize.jsonl", "sft/which_module.jsonl", "sft/explain_topic.jsonl",
              "preferences.jsonl"):
        ps = [r["prompt"] for r in files[n]]
        assert len(ps) == len(set(ps)), f"{n}: duplicate prompts"
    for r in files["sft/summarize.jsonl"] + held:
        assert len(r["prompt"]) <= MAX_PROMPT_CHARS, r["id"]

    total_bytes = 0
    for name, recs in files.items():
        write_jsonl(OUT_DIR / name, recs)
        nbytes = (OUT_DIR / name).stat().st_size
        total_bytes += nbytes
        print(f"{name:26s} {len(recs):5d} records {nbytes:9,d} bytes")
    print(f"{'total':26s} {sum(len(r) for r in files.values()):5d} records {total_bytes:9,d} bytes")


if __name__ == "__main__":
    main()
