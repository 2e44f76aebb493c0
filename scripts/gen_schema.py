#!/usr/bin/env python3
"""Generates the object tables of schema `stripe` from the registry and Stripe's example objects.

Usage:
  scripts/gen_schema.py NNNN_name   writes migrations/NNNN_name.sql with a `create table` for every registry table
                                    that no other migration creates (migrations are never edited once applied);
  scripts/gen_schema.py --check     regenerates every generated migration from the tables it creates and fails
                                    when one differs from what is committed (CI runs it).

Every table has the same fixed columns (docs/design.md): the key `(_account_id, livemode, id)`, with `_parent_id`
before `id` for lists a parent owns (`subscription_items`: the same item id can appear under two parents on old API
versions); `deleted`, `_raw_data`, and the ordering state `_last_event_id`, `_last_event_created`,
`_last_event_rank`, `_last_event_seq`, `_ambiguous`.

Typed columns are plain columns that the applier fills from the object's JSON in its upsert, by column type,
through the stripe.j_* functions (migrations/0001), so they never fail an insert (docs/design.md explains why
they are not generated columns). A column's type comes from every example of the object type found anywhere in
testdata/stripe (fixtures3.json and the peer events, nested objects included):
  string -> text, integer -> bigint, float -> numeric, boolean -> boolean, object/array -> jsonb,
  string or object (an expandable field) -> text (the id), only ever null -> text, other mixes -> jsonb.
"""
import glob
import json
import os
import re
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXED = ["id", "object", "livemode", "deleted"]  # kept in fixed columns, or meaningless per table
# Embedded lists Stripe's examples only show as null (so `columns_of` can't see they are lists): no typed column.
LISTS_WITHOUT_EXAMPLE = {("customer", "subscriptions")}


def examples():
    """Every dict with an `object` and an `id` (or no id: balance) found in the test data, by object type."""
    found = {}
    sources = [json.load(open(os.path.join(ROOT, "testdata/stripe/fixtures3.json")))["resources"]]
    for path in sorted(glob.glob(os.path.join(ROOT, "testdata/stripe/peer-events/*.json"))):
        sources.append(json.load(open(path))["data"])

    def walk(value):
        if isinstance(value, dict):
            kind = value.get("object")
            if isinstance(kind, str) and kind not in ("list", "event") and value.get("deleted") is not True:
                found.setdefault(kind, []).append(value)
            for child in value.values():
                walk(child)
        elif isinstance(value, list):
            for child in value:
                walk(child)

    for source in sources:
        walk(source)
    return found


def json_kind(value):
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (dict, list)):
        return "json"
    return None


def column_type(kinds):
    kinds = set(kinds) - {None}
    if not kinds or kinds == {"string"} or kinds == {"string", "json"}:
        return "text"
    if kinds == {"integer"}:
        return "bigint"
    if kinds <= {"integer", "float"}:
        return "numeric"
    if kinds == {"boolean"}:
        return "boolean"
    return "jsonb"




def is_list(value):
    return isinstance(value, dict) and value.get("object") == "list"


def columns_of(object_type, samples):
    """Typed columns of an object type. Embedded lists (`{"object": "list"}`) get none: they are child tables, and a
    jsonb copy would double the bytes written for the biggest objects (docs/benchmarks.md)."""
    fields = {}
    lists = set()
    for sample in samples:
        for field, value in sample.items():
            fields.setdefault(field, []).append(json_kind(value))
            if is_list(value):
                lists.add(field)
    lists |= {field for kind, field in LISTS_WITHOUT_EXAMPLE if kind == object_type}
    return {f: column_type(k) for f, k in sorted(fields.items()) if f not in FIXED and f not in lists}


def quote_ident(name):
    return '"' + name.replace('"', '""') + '"'


def create_table(entry, samples):
    table = entry["table"]
    owned = any(e.get("owned") for e in entry.get("embedded_in", []))
    lines = ["    _account_id text not null", "    id text not null"]
    if owned:
        lines.append("    _parent_id text not null")
    for field, kind in columns_of(entry["type"], samples).items():
        lines.append(f"    {quote_ident(field)} {kind}")
    key = "_account_id, livemode, _parent_id, id" if owned else "_account_id, livemode, id"
    # The order of the last columns matches tables created before the squash and upgraded in place.
    lines += [
        "    livemode boolean not null",
        "    deleted boolean not null default false",
        "    _raw_data jsonb not null",
        "    _last_event_id text",
        "    _last_event_created bigint not null",
        "    _last_event_seq bigint not null",
        "    _updated_at timestamptz not null default now()",
        "    _last_event_rank integer not null",
        "    _ambiguous boolean not null default false",
        f"    primary key ({key})",
    ]
    name = quote_ident(table)
    sql = f"-- Stripe object `{entry['type']}`\ncreate table stripe.{name} (\n" + ",\n".join(lines) + "\n);\n"
    # Rows the ordering rule decided by a bare same-second tie: few, looked up by the API side.
    sql += f"create index {quote_ident(table + '_ambiguous_idx')} on stripe.{name} (_account_id) where _ambiguous;\n"
    return sql


HEADER = "-- Generated by scripts/gen_schema.py from applier/registry.toml and testdata/stripe. Do not edit.\n"
CREATES = re.compile(r'create table stripe\."?([a-z0-9_]+)"?')


def migration_files():
    return sorted(glob.glob(os.path.join(ROOT, "migrations/*.sql")))


def render(entries, found):
    parts = [HEADER]
    for entry in entries:
        samples = found.get(entry["type"], [])
        if not samples:
            print(f"warning: no example of {entry['type']}: only fixed columns", file=sys.stderr)
        parts.append(create_table(entry, samples))
    parts.append("-- lz4 compression on the new columns where the server supports it (migrations/0001).\nselect stripe.use_lz4();\n")
    return "\n".join(parts)


def check(registry, found):
    """Regenerates each generated migration from the tables it creates; True when all match."""
    by_table = {entry["table"]: entry for entry in registry["object"]}
    ok = True
    for path in migration_files():
        text = open(path).read()
        if not text.startswith(HEADER):
            continue
        tables = CREATES.findall(text)
        entries = [by_table[t] for t in by_table if t in tables]
        missing = set(tables) - set(by_table)
        if missing:
            print(f"{path}: tables not in the registry: {sorted(missing)}", file=sys.stderr)
            ok = False
        if render(entries, found) != text:
            print(f"{os.path.relpath(path, ROOT)} differs from what scripts/gen_schema.py generates", file=sys.stderr)
            ok = False
    created = {t for path in migration_files() for t in CREATES.findall(open(path).read())}
    for table in by_table:
        if table not in created:
            print(f"registry table {table} has no migration: run scripts/gen_schema.py NNNN_name", file=sys.stderr)
            ok = False
    return ok


def main():
    registry = tomllib.load(open(os.path.join(ROOT, "applier/registry.toml"), "rb"))
    found = examples()
    if sys.argv[1:] == ["--check"]:
        sys.exit(0 if check(registry, found) else 1)
    if len(sys.argv) != 2 or not re.fullmatch(r"\d{4}_[a-z0-9_]+", sys.argv[1]):
        sys.exit(__doc__)
    name = sys.argv[1] + ".sql"
    done = {t for path in migration_files() if os.path.basename(path) != name for t in CREATES.findall(open(path).read())}
    entries = [entry for entry in registry["object"] if entry["table"] not in done]
    if not entries:
        sys.exit("nothing to generate: every registry table already exists in a migration")
    with open(os.path.join(ROOT, "migrations", name), "w") as out:
        out.write(render(entries, found))
    print(f"wrote migrations/{name} ({len(entries)} tables)")


if __name__ == "__main__":
    main()
