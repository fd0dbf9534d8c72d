package conflict_test

import rego.v1

import data.conflict

test_conflicting_level if {
	conflict.level == "high" with input as {"limit": 10}
}
