package gateway.dispatch

import rego.v1

default allow := false

allow if {
	input.subject.role == "admin"
}

allow if {
	input.subject.role == "user"
	input.task.capability in data.limits.allowed
}

reasons contains "not an admin or an allowed capability" if not allow

decision := {"allow": allow, "reasons": reasons}
