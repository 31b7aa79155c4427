"""Demo skill: text-to-SQL over one fixed `employees` table, scored by executing the query.

The scorer runs the model's SQL and the reference SQL on the same small sqlite3 database
(built fresh in memory for each call, so a destructive statement harms nothing) and
compares the result rows: as lists when the reference orders them, as multisets otherwise.
"""
from __future__ import annotations

import random
import re
import sqlite3
from collections import Counter

from skillpack_evals.skills.examples import Example

name = "sql"
max_new_tokens = 40

SCHEMA = "employees(name, dept, city, salary)"
DEPTS = ["Sales", "Legal", "Finance", "Support", "Research", "Marketing"]
CITIES = ["Boston", "Denver", "Austin", "Seattle", "Miami", "Chicago", "Phoenix", "Atlanta"]
_MAX_VM_STEPS = 200_000  # sqlite progress-handler calls before a query is abandoned


def _rows() -> list[tuple[str, str, str, int]]:
    rng = random.Random(1234)  # the database is fixed: same rows on every machine
    return [(f"emp{i:02d}", rng.choice(DEPTS), rng.choice(CITIES), rng.randrange(30_000, 150_000, 500))
            for i in range(60)]


def _templates(rng: random.Random) -> tuple[str, str]:
    d, c, n = rng.choice(DEPTS), rng.choice(CITIES), rng.randrange(40_000, 140_000, 1000)
    choices = [
        (f"List the names of employees in the {d} department.",
         f"SELECT name FROM employees WHERE dept = '{d}';"),
        (f"How many employees work in {c}?", f"SELECT COUNT(*) FROM employees WHERE city = '{c}';"),
        (f"What is the average salary in the {d} department?",
         f"SELECT AVG(salary) FROM employees WHERE dept = '{d}';"),
        (f"List the names of employees earning more than {n}.",
         f"SELECT name FROM employees WHERE salary > {n};"),
        (f"How many {d} employees earn less than {n}?",
         f"SELECT COUNT(*) FROM employees WHERE dept = '{d}' AND salary < {n};"),
        (f"Which employees in {c} work in {d}?",
         f"SELECT name FROM employees WHERE city = '{c}' AND dept = '{d}';"),
        (f"What is the highest salary in {c}?", f"SELECT MAX(salary) FROM employees WHERE city = '{c}';"),
        (f"List the {d} employees in {c} from highest to lowest salary.",
         f"SELECT name FROM employees WHERE dept = '{d}' AND city = '{c}' ORDER BY salary DESC;"),
    ]
    return rng.choice(choices)


def generate(rng: random.Random) -> Example:
    question, query = _templates(rng)
    return Example(f"Table {SCHEMA}. Write the SQL query: {question}", query)


def extract_sql(text: str) -> str:
    """The first statement in `text`, without code fences or anything after the first `;`."""
    text = re.sub(r"```(?:sql)?", "", text, flags=re.IGNORECASE).strip()
    return text.split(";", 1)[0].strip()


def run_query(sql: str) -> list[tuple] | None:
    """Rows `sql` returns on the fixed database, or None when it fails or runs too long."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("CREATE TABLE employees (name TEXT, dept TEXT, city TEXT, salary INTEGER)")
        conn.executemany("INSERT INTO employees VALUES (?, ?, ?, ?)", _rows())
        steps = [0]

        def abort_when_long() -> int:
            steps[0] += 1
            return int(steps[0] > _MAX_VM_STEPS)

        conn.set_progress_handler(abort_when_long, 100)
        return conn.execute(sql).fetchmany(10_000)
    except (sqlite3.Error, sqlite3.Warning, ValueError):
        return None
    finally:
        conn.close()


def score(output: str, example: Example) -> bool:
    got, want = run_query(extract_sql(output)), run_query(extract_sql(example.response))
    if got is None or want is None:
        return False
    if "ORDER BY" in example.response.upper():
        return got == want
    return Counter(got) == Counter(want)
