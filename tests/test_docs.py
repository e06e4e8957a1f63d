"""The project's own documentation: no pointer to material or folders a user who clones the project lacks,
and every relative link in README.md and docs/ resolves."""
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _project_files():
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:        # not a git checkout: walk the tree
        return [os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(ROOT) for f in fs
                if ".git" not in d]
    return out.stdout.split()


def test_no_file_points_at_the_shared_docs():
    bad = []
    for rel in _project_files():
        if rel.startswith("tests/") or not rel.endswith((".py", ".md", ".h", ".cpp", ".cu", ".sh", ".toml", ".txt",
                                                         ".json")):
            continue
        with open(os.path.join(ROOT, rel), errors="replace") as f:
            text = f.read()
        if "shared/docs" in text or "ALGORITHM.md" in text or "../shared" in text or "/work/shared" in text:
            bad.append(rel)
    assert not bad, f"files pointing at docs a user does not have: {bad}"


def test_relative_links_in_readme_and_docs_resolve():
    docs = ["README.md"] + [os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md")]
    broken = []
    for doc in docs:
        base = os.path.dirname(os.path.join(ROOT, doc))
        text = open(os.path.join(ROOT, doc)).read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+://", target) or target.startswith("#") or target.startswith("mailto:"):
                continue
            path = target.split("#")[0]
            if path and not os.path.exists(os.path.normpath(os.path.join(base, path))):
                broken.append(f"{doc}: {target}")
    assert not broken, broken
