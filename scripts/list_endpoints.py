#!/usr/bin/env python3
"""Derives which API operation lists each Stripe object type, from Stripe's official Python SDK (PyPI `stripe`).

Usage: python3 -m pip install stripe==16.1.0 && scripts/list_endpoints.py > testdata/stripe/list-endpoints.json

For every `*Service` class of the SDK with a `list` method returning `ListObject[X]`, it records X's `object` name,
the operation's path (`/v1/customers`, `/v1/invoices/{invoice}/lines`), the path parameters (a parent id the list
needs), the list's required query parameters, whether it filters by `created`, and the values its `status` filter
accepts. The registry (`applier/registry.toml`) takes its `list` entries from this file, and a unit test checks they
agree, so no endpoint is guessed.
"""
import importlib
import inspect
import json
import pkgutil
import re
import sys

import stripe

LIST_OBJECT = re.compile(r'"ListObject\[(\w+)\]"')
PATH = re.compile(r'"(/v1/[^"]+)"')


def services():
    seen = set()
    for module in pkgutil.walk_packages(stripe.__path__, "stripe."):
        if not module.name.rsplit(".", 1)[-1].endswith("_service"):
            continue
        try:
            mod = importlib.import_module(module.name)
        except Exception:  # a module needing an optional dependency
            continue
        for name, cls in inspect.getmembers(mod, inspect.isclass):
            if name.endswith("Service") and cls.__module__ == mod.__name__ and cls not in seen:
                seen.add(cls)
                yield cls


IMPORT = re.compile(r"from (stripe[\w.]*) import \(?\s*(\w+)")


def object_name(service, class_name):
    """The `object` of the resource class a service's module imports as `class_name` (`Card` is a card in
    `stripe._customer_service` and an Issuing card in `stripe.issuing._card_service`)."""
    source = inspect.getsource(sys.modules[service.__module__])
    for module, name in IMPORT.findall(source):
        if name == class_name:
            cls = getattr(importlib.import_module(module), name, None)
            value = getattr(cls, "OBJECT_NAME", None)
            if isinstance(value, str):
                return value
    return None


def params_class(service, method):
    """The TypedDict of a list method's query parameters, from its signature's annotation."""
    found = re.search(r'"(\w+Params)"', inspect.getsource(method))
    if not found:
        return None
    source = inspect.getsource(sys.modules[service.__module__])
    for module, name in IMPORT.findall(source):
        if name == found.group(1):
            return getattr(importlib.import_module(module), name, None)
    return None


def main():
    out = {}
    for cls in services():
        method = getattr(cls, "list", None)
        if method is None:
            continue
        source = inspect.getsource(method)
        listed, path = LIST_OBJECT.search(source), PATH.search(source)
        name = listed and object_name(cls, listed.group(1))
        if not path or not name:
            continue
        entry = {"path": path.group(1), "path_params": re.findall(r"\{(\w+)\}", path.group(1))}
        params = params_class(cls, method)
        if params is not None:
            fields = params.__annotations__
            options = set(getattr(stripe, "RequestOptions", dict).__annotations__)
            entry["required"] = sorted(
                k for k in fields if k not in options and "NotRequired" not in str(fields[k])
            )
            entry["created_filter"] = "created" in fields
            literals = re.findall(r"'(\w+)'", str(fields.get("status", "")))
            if literals:
                entry["status_values"] = sorted(set(literals))
        out.setdefault(name, []).append(entry)
    for entries in out.values():
        entries.sort(key=lambda e: (len(e["path_params"]), e["path"]))
    json.dump(
        {
            "_source": f"Derived from Stripe's Python SDK (PyPI stripe {stripe.VERSION}, API version "
            f"{stripe.api_version}) by scripts/list_endpoints.py: each object type's list operations, top-level ones first.",
            **dict(sorted(out.items())),
        },
        sys.stdout,
        indent=1,
    )
    print()


if __name__ == "__main__":
    main()
