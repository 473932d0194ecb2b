"""Source text of throwaway plugins the tests write to disk (a package, loose files, broken ones)."""

GOOD_METHOD = '''
"""Keeps the tokens with the largest L2 norm: a complete third-party method."""
import tokenbench
from tokenbench import Reduction, Site, Stage, TokenCompressor


class NormKeep(TokenCompressor):
    name = "{name}"
    stages = (Stage.PROJECTOR,)
    paper = "third-party example"

    class Options(TokenCompressor.Options):
        largest: bool = True

    def schedule(self, n_visual, budget, info):
        keep = round(budget)
        return [] if keep >= n_visual else [(Site(Stage.PROJECTOR), keep)]

    def reduce(self, x):
        norms = x.visual.float().norm(dim=-1)
        top = norms.topk(x.keep, dim=1, largest=self.options.largest).indices
        return Reduction(top.sort(dim=1).values)


@tokenbench.hookimpl
def register_compressors(register):
    register(NormKeep)
'''

IMPORT_ERROR = "import tokenbench\nimport no_such_module_for_tokenbench_tests\n"

MISSPELLED_HOOK = '''
import tokenbench

@tokenbench.hookimpl
def register_compresors(register):
    pass
'''

INVALID_REGISTRATION = '''
import tokenbench

@tokenbench.hookimpl
def register_compressors(register):
    register(object)
'''

RAISING_HOOK = '''
import tokenbench

@tokenbench.hookimpl
def register_compressors(register):
    raise RuntimeError("boom")
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "tokenbench-normkeep"
version = "0.3.1"

[project.entry-points.tokenbench]
normkeep = "tokenbench_normkeep"

[tool.setuptools]
py-modules = ["tokenbench_normkeep"]
'''
