import sys
import types

import pytest

from t3s.answers import answers_equal, check_completion, extract_answer, get_verifier


@pytest.mark.parametrize("text, expected", [
    ("so the answer is \\boxed{33}", "33"),
    ("\\boxed{\\frac{1}{2}} then \\boxed{x^{2}+1}", "x^{2}+1"),  # last box, nested braces
    ("\\boxed{\\sqrt{\\frac{a}{b}}}", "\\sqrt{\\frac{a}{b}}"),
    ("\\fbox{7}", "7"),
    ("\\boxed 5 done", "5"),
    ("55+39=94,94-61=33.####33", "33"),
    ("work #### 12\nmore text", "12"),
    ("<think>\\boxed{1}</think> final #### 2", "2"),
    ("no marker at all", None),
    ("\\boxed{unclosed", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("a, b, equal", [
    ("33", "33", True), (" 33. ", "33", True), ("1,000", "1000.0", True), ("1/2", "0.5", True),
    ("\\frac{1}{2}", "0.5", True), ("\\dfrac{3}{4}", "\\frac{3}{4}", True), ("\\text{12}", "12", True),
    ("32", "33", False), ("abc", "abd", False), (None, "1", False),
])
def test_answers_equal_without_math_verify(a, b, equal):
    assert answers_equal(a, b, method="numeric") is equal


def test_exact_method_is_strict():
    assert answers_equal("1/2", "0.5", method="exact") is False
    assert answers_equal("1/2", "1/2", method="exact") is True


def test_check_completion_extracts_from_gold_too():
    assert check_completion("Check ok. So the answer is \\boxed{33}", "33")
    assert check_completion("\\boxed{33}", "a full solution #### 33")
    assert not check_completion("I don't know", "33")


def test_user_verifier_module_function(monkeypatch):
    mod = types.ModuleType("my_verifiers")
    mod.always = lambda completion, gold: completion.endswith(gold)
    monkeypatch.setitem(sys.modules, "my_verifiers", mod)
    v = get_verifier("my_verifiers:always")
    assert v("abc 7", "7") and not v("abc 8", "7")


@pytest.mark.parametrize("spec, match", [("nonsense", "module:function"), ("no_such_mod_xyz:f", "cannot import"),
                                         ("t3s.answers:nope", "no callable")])
def test_bad_verifier_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        get_verifier(spec)


def test_list_of_accepted_gold_answers():
    from t3s.pipeline import _gold_checker

    check = _gold_checker(get_verifier("auto"))
    assert check("\\boxed{4}", ["3", "4"]) and not check("\\boxed{5}", ["3", "4"])
