"""A schema change without a contract-version bump fails here.

After an intentional change: bump CONTRACT_VERSION in data_contracts/<stage>.py, then
`python -m tests.contracts.test_golden_schemas --update` and commit the new golden file.
"""
import json
import sys
from pathlib import Path

from data_contracts.registry import schema_snapshot

GOLDEN = Path(__file__).with_name("golden_schemas.json")


def test_schemas_match_golden_unless_version_bumped():
    golden = json.loads(GOLDEN.read_text())
    current = schema_snapshot()
    problems = []
    for stage, now in current.items():
        old = golden.get(stage)
        if old is None:
            problems.append(f"{stage}: new contract — run the --update command and commit the golden file")
            continue
        changed = now["schemas"] != old["schemas"] or now["manifest"] != old["manifest"]
        if changed and now["contract_version"] == old["contract_version"]:
            problems.append(f"{stage}: schema or manifest changed without a contract-version bump "
                            f"(still {now['contract_version']})")
        elif now["contract_version"] != old["contract_version"]:
            problems.append(f"{stage}: contract version {old['contract_version']} -> {now['contract_version']}: "
                            "refresh the golden file with --update")
    assert not problems, "\n".join(problems)


if __name__ == "__main__" and "--update" in sys.argv:
    GOLDEN.write_text(json.dumps(schema_snapshot(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
