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

# --- A2A: decided per JSON-RPC method -------------------------------------------------

a2a_req(method) := {
	"method": "POST",
	"route": "/a2a/{agent}",
	"params": {"agent": "echo", "method": method, "wire_method": method, "version": "1.0"},
	"protocol": "a2a",
}

a2a(subject, method, resource) := d if {
	d := api.decision with input as {
		"subject": subject,
		"request": a2a_req(method),
		"resource": resource,
	}
}

echo_agent := {"kind": "agent", "name": "echo"}

test_a2a_user_may_send_a_message if a2a(alice, "SendMessage", echo_agent).allow

test_a2a_auditor_may_not_send_a_message if {
	d := a2a(auditor, "SendStreamingMessage", echo_agent)
	not d.allow
	d.reasons == ["A2A SendStreamingMessage needs one of the roles [\"user\"]"]
}

test_a2a_anonymous_needs_a_key if {
	d := a2a(anonymous, "SendMessage", echo_agent)
	not d.allow
	"this call needs an API key" in d.reasons
}

test_a2a_unknown_method_is_refused if {
	d := a2a(alice, "DeleteEverything", echo_agent)
	not d.allow
	"no rule allows A2A DeleteEverything" in d.reasons
}

test_a2a_owner_may_get_and_cancel if {
	a2a(alice, "GetTask", alices_task).allow
	a2a(alice, "CancelTask", alices_task).allow
	a2a(alice, "SubscribeToTask", alices_task).allow
}

test_a2a_other_user_is_told_not_found if {
	d := a2a(bob, "GetTask", alices_task)
	not d.allow
	d.conceal == true
}

test_a2a_auditor_may_read_but_not_cancel if {
	a2a(auditor, "GetTask", alices_task).allow
	d := a2a(auditor, "CancelTask", alices_task)
	not d.allow
	d.conceal == false
}

test_a2a_list_is_own_for_users if {
	d := a2a(alice, "ListTasks", {"kind": "tasks"})
	d.allow
	d.scope == "own"
}

public_push := {"url": "https://hooks.example.com/a2a", "scheme": "https", "host": "hooks.example.com", "port": 443, "addresses": [{"ip": "93.184.216.34", "public": true}]}

loopback_push := {"url": "http://127.0.0.1:9/x", "scheme": "http", "host": "127.0.0.1", "port": 9, "addresses": [{"ip": "127.0.0.1", "public": false}]}

push_req(push) := object.union(
	a2a_req("CreateTaskPushNotificationConfig"),
	{"params": object.union(a2a_req("CreateTaskPushNotificationConfig").params, {"push": push})},
)

push_call(push) := d if {
	d := api.decision with input as {"subject": alice, "request": push_req(push), "resource": alices_task}
}

test_a2a_push_to_a_public_address_is_allowed if push_call(public_push).allow

test_a2a_push_to_loopback_is_refused if {
	d := push_call(loopback_push)
	not d.allow
	d.reasons == ["push notifications may not go to 127.0.0.1: 127.0.0.1 is not a public address"]
}

test_a2a_push_to_an_allowed_host_is_allowed if {
	d := api.decision with input as {"subject": alice, "request": push_req(loopback_push), "resource": alices_task}
		with data.config.a2a.push_allowed_hosts as ["127.0.0.1"]
	d.allow
}

test_a2a_push_to_a_host_that_does_not_resolve_is_refused if {
	d := push_call(object.union(public_push, {"addresses": []}))
	not d.allow
}

test_a2a_push_must_be_http if {
	d := push_call(object.union(public_push, {"scheme": "file"}))
	not d.allow
}

test_a2a_card_routes_are_public if {
	call(anonymous, "GET", "/a2a/{agent}/.well-known/agent-card.json").allow
	call(anonymous, "GET", "/.well-known/agent-card.json").allow
	call(anonymous, "GET", "/.well-known/jwks.json").allow
}

test_task_events_follow_task_reads if {
	d := api.decision with input as {
		"subject": bob,
		"request": req("GET", "/v1/tasks/{task_id}/events"),
		"resource": alices_task,
	}
	not d.allow
	d.conceal == true
}

# --- MCP (POST /mcp): any key speaks the protocol; tools are the dispatch policy's --------

mcp_call(subject, method) := d if {
	d := api.decision with input as {
		"subject": subject,
		"request": {"method": method, "route": "/mcp", "params": {"rpc": "tools/list"}, "protocol": "mcp"},
		"resource": {"kind": "mcp"},
	}
}

test_mcp_needs_a_key if {
	not mcp_call(anonymous, "POST").allow
	mcp_call(alice, "POST").allow
	mcp_call(auditor, "POST").allow
	mcp_call(alice, "DELETE").allow
}

test_mcp_metadata_is_public if {
	d := api.decision with input as {
		"subject": anonymous,
		"request": req("GET", "/.well-known/oauth-protected-resource/mcp"),
		"resource": {"kind": "public"},
	}
	d.allow
}
