package gateway.api_test

import rego.v1

import data.gateway.api

alice := {"authenticated": true, "id": "alice", "roles": ["user"], "key_id": "k1"}

bob := {"authenticated": true, "id": "bob", "roles": ["user"], "key_id": "k2"}

auditor := {"authenticated": true, "id": "aud1", "roles": ["auditor"], "key_id": "k3"}

operator := {"authenticated": true, "id": "ops", "roles": ["operator"], "key_id": "k4"}

admin := {"authenticated": true, "id": "root", "roles": ["admin"], "key_id": "k5"}

anonymous := {"authenticated": false, "roles": []}

req(method, route) := {"method": method, "route": route, "params": {}, "protocol": "http"}

alices_task := {"kind": "task", "id": "t1", "owner": "alice", "state": "running", "agent": "echo"}

on_task(subject, method) := d if {
	d := api.decision with input as {
		"subject": subject,
		"request": req(method, "/v1/tasks/{task_id}"),
		"resource": alices_task,
	}
}

call(subject, method, route) := d if {
	d := api.decision with input as {
		"subject": subject,
		"request": req(method, route),
		"resource": {"kind": "hub"},
	}
}

# --- tasks ----------------------------------------------------------------------------

test_user_may_submit if call(alice, "POST", "/v1/tasks").allow

test_auditor_may_not_submit if {
	d := call(auditor, "POST", "/v1/tasks")
	not d.allow
	d.reasons == ["POST /v1/tasks needs one of the roles [\"user\"]"]
}

test_owner_may_read_own_task if on_task(alice, "GET").allow

test_owner_may_cancel_own_task if on_task(alice, "DELETE").allow

test_other_user_may_not_read_and_is_told_not_found if {
	d := on_task(bob, "GET")
	not d.allow
	d.conceal == true
}

test_other_user_may_not_cancel_and_is_told_not_found if {
	d := on_task(bob, "DELETE")
	not d.allow
	d.conceal == true
}

# The hole a review found: a read-only auditor cancelled another user's task.
test_auditor_may_read_but_not_cancel_someone_elses_task if {
	on_task(auditor, "GET").allow
	d := on_task(auditor, "DELETE")
	not d.allow
	d.conceal == false
	d.reasons == ["task t1 belongs to another subject; DELETE /v1/tasks/{task_id} needs one of the roles [\"operator\"]"]
}

test_operator_may_cancel_any_task if on_task(operator, "DELETE").allow

test_admin_may_cancel_any_task if on_task(admin, "DELETE").allow

test_operator_may_cancel_own_task if {
	d := on_task({"authenticated": true, "id": "alice", "roles": ["operator"]}, "DELETE")
	d.allow
}

test_owner_without_user_role_may_not_cancel if {
	d := on_task({"authenticated": true, "id": "alice", "roles": ["auditor"]}, "DELETE")
	not d.allow
}

test_list_scope_is_own_for_users_and_all_for_operators_and_auditors if {
	call(alice, "GET", "/v1/tasks").scope == "own"
	call(auditor, "GET", "/v1/tasks").scope == "all"
	call(operator, "GET", "/v1/tasks").scope == "all"
	call(admin, "GET", "/v1/tasks").scope == "all"
}

# --- audit and operations -------------------------------------------------------------

test_only_auditors_read_decisions if {
	call(auditor, "GET", "/v1/decisions").allow
	call(auditor, "GET", "/v1/decisions/{decision_id}").allow
	call(auditor, "GET", "/v1/decisions/verify").allow
	not call(alice, "GET", "/v1/decisions").allow
	not call(operator, "GET", "/v1/decisions/{decision_id}").allow
}

test_only_operators_administer if {
	call(operator, "POST", "/v1/admin/reload").allow
	call(operator, "POST", "/v1/admin/mode").allow
	call(operator, "POST", "/v1/admin/identity/rotate").allow
	call(operator, "GET", "/v1/status").allow
	not call(auditor, "POST", "/v1/admin/mode").allow
	not call(alice, "GET", "/v1/status").allow
}

test_any_key_reads_the_registry if {
	call(auditor, "GET", "/v1/agents").allow
	call(alice, "GET", "/v1/agents/{name}").allow
}

# --- authentication and unknown calls ---------------------------------------------------

test_anonymous_reaches_public_calls_only if {
	call(anonymous, "GET", "/healthz").allow
	call(anonymous, "GET", "/metrics").allow
	call(anonymous, "GET", "/openapi.json").allow
	call(anonymous, "GET", "/audit").allow
	d := call(anonymous, "GET", "/v1/agents")
	not d.allow
	d.reasons == ["this call needs an API key"]
}

test_anonymous_may_not_read_a_task if {
	d := on_task(anonymous, "GET")
	not d.allow
	"this call needs an API key" in d.reasons
}

test_unknown_call_is_denied if {
	d := call(admin, "PUT", "/v1/tasks")
	not d.allow
	d.reasons == ["no rule allows PUT /v1/tasks"]
}

# Roles come from the verified key only: a "roles" field in the body is never read.
test_roles_in_params_grant_nothing if {
	d := api.decision with input as {
		"subject": alice,
		"request": {"method": "GET", "route": "/v1/status", "params": {"roles": ["operator"]}},
		"resource": {"kind": "hub"},
	}
	not d.allow
}

test_missing_subject_is_denied if {
	d := api.decision with input as {"request": req("GET", "/v1/agents"), "resource": {"kind": "hub"}}
	not d.allow
}
