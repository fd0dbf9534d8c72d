package gateway.untested

import rego.v1

flag if {
	input.x == 1
	input.y == 2
}
