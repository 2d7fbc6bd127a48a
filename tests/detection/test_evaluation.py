import sys, detection.evaluation
def test_x(): print(__name__, detection.evaluation.__file__, sys.path[:3]); assert 0
