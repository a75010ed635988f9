"""The ground-floor Rego wrapper: compile errors, undefined rules, failing inputs, data documents."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from coco.errors import AgentPolicyError, RegoError
from coco.rego import RegoPolicy

POLICY = """package t
import rego.v1

default allow := false
allow if input.user in data.users
level := data.levels[input.user]
conflict := 1 if input.clash
conflict := 2 if input.clash
missing := nosuch(1) if input.call
"""


@pytest.fixture(scope="module")
def policy() -> RegoPolicy:
    return RegoPolicy(POLICY, "test policy", package="t", rules=("allow", "level"))


def test_defined_rules_and_data_documents(policy: RegoPolicy) -> None:
    data = {"users": ["alice"], "levels": {"alice": 3}}
    assert policy.evaluate({"user": "alice"}, data) == {"allow": True, "level": 3}
    # Another data document gives another answer (a bundle per document, never a stale one).
    other = {"users": ["bob"], "levels": {"bob": 1}}
    assert policy.evaluate({"user": "alice"}, other) == {"allow": False}
    assert policy.evaluate({"user": "bob"}, other) == {"allow": True, "level": 1}
    assert policy.evaluate({"user": "alice"}, data) == {"allow": True, "level": 3}


def test_undefined_rule_is_absent(policy: RegoPolicy) -> None:
    assert policy.evaluate({"user": "carol"}, {"users": [], "levels": {}}) == {"allow": False}
    assert policy.evaluate({}, {}, rules=("level",)) == {}
    assert policy.evaluate({}, {}, rules=("no_such_rule",)) == {}


def test_input_that_makes_the_policy_fail(policy: RegoPolicy) -> None:
    assert policy.evaluate({"clash": False}, rules=("conflict",)) == {}
    with pytest.raises(RegoError, match=r"^test policy: rule conflict: evaluation failed: "):
        policy.evaluate({"clash": True}, rules=("conflict",))
    with pytest.raises(RegoError) as e:
        policy.evaluate({"call": True}, rules=("allow", "missing"))
    assert str(e.value) == (
        "test policy: rules allow, missing: evaluation failed: Function not found: nosuch"
    )


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"x": {1, 2}}, "test policy: input: expected JSON values, found set"),
        ({"x": 1 << 70}, f"test policy: input: expected a 64-bit integer, found {1 << 70}"),
    ],
)
def test_input_that_is_not_json(policy: RegoPolicy, doc: dict, message: str) -> None:
    with pytest.raises(RegoError) as e:
        policy.evaluate(doc)
    assert str(e.value) == message


def test_input_values_arrive_as_json(policy: RegoPolicy) -> None:
    p = RegoPolicy("package t\nv := input\n", "p", package="t", rules=("v",))
    doc = {"s": "é ✓", "i": -(1 << 63), "f": 1.5, "n": None, "b": [True, False], "t": (1, "2")}
    assert p.evaluate(doc) == {"v": {**doc, "t": [1, "2"]}}


def test_data_that_is_not_json(policy: RegoPolicy) -> None:
    with pytest.raises(RegoError, match=r"^test policy: data: expected a JSON document: "):
        policy.evaluate({}, {"users": {"a"}})


@pytest.mark.parametrize(
    ("text", "modules", "message"),
    [
        (
            "package t\n\nallow if {\n",
            None,
            "p.rego: Rego does not compile: line 3 column 10: this is unclosed",
        ),
        (
            "package t\nv := 1\n",
            {"helper.rego": "package t\n\nf(x) := "},
            "p.rego: Rego does not compile: helper.rego line 3 column 6: "
            "Invalid assignment operator",
        ),
        ("# package t\nv := 1\n", None, "p.rego: expected a 'package t' declaration, found none"),
        ("package t.sub\nv := 1\n", None, "p.rego: expected 'package t', found 't.sub'"),
    ],
)
def test_load_errors(text: str, modules: dict | None, message: str) -> None:
    for rules in (("v",), ()):  # with rules (compiled) and without (parsed only)
        with pytest.raises(RegoError) as e:
            RegoPolicy(text, "p.rego", package="t", rules=rules, modules=modules)
        assert str(e.value) == message


def test_rule_names_are_checked(policy: RegoPolicy) -> None:
    with pytest.raises(RegoError, match=r"^test policy: expected a rule name, found 'a\]; x'"):
        policy.evaluate({}, rules=("a]; x",))


def test_helper_modules_and_the_callers_error_family() -> None:
    helper = {"h.rego": "package t\n\ndouble(x) := 2 * x\n"}
    p = RegoPolicy("package t\nv := double(input.n)\n", "p", package="t", modules=helper)
    assert p.evaluate({"n": 21}, rules=("v",)) == {"v": 42}
    with pytest.raises(AgentPolicyError, match=r"^q: Rego does not compile: line 1 column"):
        RegoPolicy("package t {", "q", package="t", error=AgentPolicyError)


def test_print_output_kept_off_stdout() -> None:
    code = (
        "from coco.rego import RegoPolicy\n"
        "p = RegoPolicy('package t\\nimport rego.v1\\nv if { print(\"noise\"); true }\\n', 'p',"
        " package='t', rules=('v',))\n"
        "print(p.evaluate({}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert (r.stdout, r.stderr) == ("{'v': True}\n", "")


def test_concurrent_evaluations(policy: RegoPolicy) -> None:
    printing = RegoPolicy(
        'package t\nimport rego.v1\nv := input.n if { print("n", input.n) }\n', "p", package="t"
    )
    data = {"users": ["u3"], "levels": {}}

    def one(n: int) -> tuple[dict, dict]:
        return policy.evaluate({"user": f"u{n}"}, data), printing.evaluate({"n": n}, rules=("v",))

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(64)))
    assert results == [({"allow": n == 3}, {"v": n}) for n in range(64)]
