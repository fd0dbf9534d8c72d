package gateway.dispatch_test

import rego.v1

import data.gateway.dispatch

test_admin_allowed if {
	dispatch.allow with input as {"subject": {"role": "admin"}}
}

test_user_allowed_for_listed_capability if {
	dispatch.allow with input as {"subject": {"role": "user"}, "task": {"capability": "text.summarize"}}
}

test_guest_denied_with_reason if {
	d := dispatch.decision with input as {"subject": {"role": "guest"}}
	not d.allow
	print("reasons:", d.reasons)
	count(d.reasons) == 1
}

todo_test_not_yet if {
	false
}
