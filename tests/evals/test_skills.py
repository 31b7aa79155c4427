"""Demo skills: seeded, disjoint splits and scorers that accept the reference and reject near misses."""
import json
import re

import pytest

from skillpack_evals.skills import SKILLS, demo_split, get_skill, make_split
from skillpack_evals.skills import arithmetic, json_extract, sql


@pytest.mark.parametrize("name", sorted(SKILLS))
def test_split_is_seeded_and_test_prompts_never_appear_in_train(name):
    train, test = demo_split(name, n_train=300, n_test=50, seed=3)
    again_train, again_test = demo_split(name, n_train=300, n_test=50, seed=3)
    assert (train, test) == (again_train, again_test)
    assert len(train) == 300 and len(test) == 50
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert len({e.prompt for e in train + test}) == 350
    assert demo_split(name, n_train=300, n_test=50, seed=4)[1] != test


@pytest.mark.parametrize("name", sorted(SKILLS))
def test_reference_answers_score_correct_and_other_examples_answers_do_not(name):
    skill = get_skill(name)
    train, test = demo_split(name, n_train=200, n_test=50)
    assert all(skill.score(e.response, e) for e in train + test)
    # another example's answer is almost always wrong for this one
    wrong = sum(skill.score(b.response, a) for a, b in zip(test, test[1:]))
    assert wrong <= 5


def test_split_refuses_more_examples_than_the_space_holds():
    with pytest.raises(ValueError, match="distinct examples"):
        make_split(lambda rng: arithmetic.Example("same", "1"), 5, 5, 0)
    with pytest.raises(ValueError, match="n_train"):
        make_split(arithmetic.generate, -1, 5, 0)


def test_get_skill_names_the_unknown_skill():
    with pytest.raises(ValueError, match="unknown skill 'poetry'"):
        get_skill("poetry")


def test_arithmetic_scorer_reads_the_final_integer():
    ex = arithmetic.Example("Start with 3. Add 4, then subtract 5.", "3 + 4 = 7, 7 - 5 = 2. The result is 2.")
    assert arithmetic.score("The answer is 2", ex)
    assert arithmetic.score("3 + 4 = 7, 7 - 5 = 2.", ex)
    assert not arithmetic.score("2 is close but the result is 3", ex)
    assert not arithmetic.score("no number here", ex)


def _replay(prompt: str) -> tuple[int, list[str]]:
    """An independent reading of the prompt: the start value, then each stated step applied."""
    start = re.match(r"Start with (\d+)\. (.*)\. What is the result\?", prompt)
    total, steps = int(start.group(1)), []
    for word, x in re.findall(r"(add|subtract) (\d+)", start.group(2).lower()):
        new = total + int(x) if word == "add" else total - int(x)
        steps.append(f"{total} {'+' if word == 'add' else '-'} {x} = {new}")
        total = new
    return total, steps


def test_arithmetic_references_are_right():
    train, test = demo_split("arithmetic", n_train=300, n_test=50)
    for e in train + test:
        total, steps = _replay(e.prompt)
        assert 3 <= len(steps) <= 4
        assert arithmetic.final_integer(e.response) == total
        assert e.response == ", ".join(steps) + f". The result is {total}."
        assert all(int(t.split(" = ")[1]) > 0 for t in steps)  # running totals stay positive


def test_json_scorer_compares_parsed_fields():
    ex = json_extract.Example("p", json.dumps({"name": "Ann Li", "age": 30, "city": "Oslo", "job": "chef"}))
    assert json_extract.score('Sure: {"age": 30, "name": "Ann Li", "job": "chef", "city": "Oslo"} done', ex)
    assert not json_extract.score('{"name": "Ann Li", "age": "30", "city": "Oslo", "job": "chef"}', ex)
    assert not json_extract.score('{"name": "Ann Li", "age": 30, "city": "Oslo"}', ex)
    assert not json_extract.score("name: Ann Li, age 30", ex)


def test_json_references_hold_what_the_sentence_says():
    train, _ = demo_split("json_extract", n_train=100, n_test=0)
    for e in train:
        obj = json.loads(e.response)
        for v in (obj["name"], str(obj["age"]), obj["city"], obj["job"]):
            assert v in e.prompt


def test_sql_scorer_executes_queries():
    ex = sql.Example("p", "SELECT name FROM employees WHERE dept = 'Sales';")
    assert sql.score("```sql\nselect NAME from employees where dept='Sales'\n```", ex)
    assert sql.score("SELECT name FROM employees WHERE dept = 'Sales' ORDER BY salary;", ex)  # same set
    assert not sql.score("SELECT name FROM employees WHERE dept = 'Legal';", ex)
    assert not sql.score("SELEC name FROM employees", ex)
    assert not sql.score("DROP TABLE employees;", ex)
    ordered = sql.Example("p", "SELECT name FROM employees WHERE dept = 'Sales' ORDER BY salary DESC;")
    assert sql.score("SELECT name FROM employees WHERE dept = 'Sales' ORDER BY salary DESC", ordered)
    assert not sql.score("SELECT name FROM employees WHERE dept = 'Sales' ORDER BY salary ASC", ordered)


def test_sql_database_answers_match_a_python_count():
    rows = sql._rows()
    for dept in sql.DEPTS:
        want = sum(r[1] == dept for r in rows)
        assert sql.run_query(f"SELECT COUNT(*) FROM employees WHERE dept = '{dept}'") == [(want,)]
    assert sql.run_query("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT max(x) FROM c") is None
