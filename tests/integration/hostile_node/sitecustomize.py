"""Makes one SuperNode of ``tests/integration/test_deploy_secagg.py`` hostile.

That SuperNode's processes (its ClientApp processes included) start with this folder first on
``PYTHONPATH``, so Python loads this module at start-up. Once fedtune's SecAgg+ client side
(``fedtune.client.secagg_stages``) is imported, its stage handler and train mod are wrapped so
that their replies are tampered with as ``FEDTUNE_TEST_SECAGG_ATTACK`` plans
(``tests.hostile_secagg``, e.g. "bad-mask-key@1,bad-share@2"); the ClientApp then binds the
wrapped ones. Everything else is fedtune's own code, from the signed-off app the SuperLink
sent.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

PLAN = os.environ.get("FEDTUNE_TEST_SECAGG_ATTACK", "")
TARGET = "fedtune.client.secagg_stages"


def _wrap(module) -> None:
    stage, train_mod = module.secagg_stage, module.secagg_train_mod

    def tampered(msg, context, reply):
        from tests import hostile_secagg  # imported late: it imports the ClientApp itself

        attack = hostile_secagg.strikes(PLAN, hostile_secagg.secagg_round(context))
        return reply if attack is None else hostile_secagg.tamper(attack, msg, reply, context)

    def hostile_stage(msg, context):
        return tampered(msg, context, stage(msg, context))

    def hostile_train_mod(msg, context, call_next):
        return tampered(msg, context, train_mod(msg, context, call_next))

    module.secagg_stage, module.secagg_train_mod = hostile_stage, hostile_train_mod


class _WrapOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # the real finders locate the module
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _wrap(module)

        spec.loader.exec_module = exec_module
        return spec


if PLAN:
    sys.meta_path.insert(0, _WrapOnImport())
