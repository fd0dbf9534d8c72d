# API authorization: may this caller make this call to the hub's HTTP API, on this resource?
#
# The hub only authenticates (an API key gives a subject; no key gives an anonymous one).
# Every role, ownership and tenancy rule of the API is here.
# input:  {"subject":  {"authenticated": bool, "id", "roles", "key_id"},
#          "request":  {"method", "route" (the route template, e.g. "/v1/tasks/{task_id}"),
#                       "params": {...path and query parameters...}, "protocol"},
#                      an A2A call (protocol "a2a", POST /a2a/{agent}) has params.method (the
#                      A2A 1.0 method, also for 0.3 clients), params.wire_method, params.version
#                      and, when it names a webhook, params.push = {"url", "scheme", "host",
#                      "port", "addresses": [{"ip", "public"}]}
#          "resource": {"kind": "task", "id", "owner", "state", "agent"}
#                    | {"kind": "tasks"} | {"kind": "agent", "name"} | {"kind": "decision"}
#                    | {"kind": "hub"} | {"kind": "public"}}
# output: decision = {"allow": bool, "reasons": [string],
#                     "scope": "all" | "own"   (list routes: whose tasks the caller sees),
#                     "conceal": bool          (answer a denial as "not found")}
package gateway.api

import rego.v1

roles := {r | some r in input.subject.roles}

# admin holds every role.
has(role) if role in roles

has(_) if "admin" in roles

has_any(wanted) if {
	some role in wanted
	has(role)
}

authenticated if input.subject.authenticated == true

call := sprintf("%s %s", [input.request.method, input.request.route])

# --- which roles each call needs ------------------------------------------------------

# Calls anyone may make, without a key: health, metrics, the API description, the audit
# page (it holds no data; the page asks for an auditor key).
public_calls := {
	"GET /healthz",
	"GET /readyz",
	"GET /metrics",
	"GET /openapi.json",
	"GET /audit",
	"GET /audit/audit.js",
	"GET /audit/audit.css",
	"GET /a2a/{agent}/.well-known/agent-card.json",
	"GET /.well-known/agent-card.json",
	"GET /.well-known/jwks.json",
	"GET /.well-known/oauth-protected-resource",
	"GET /.well-known/oauth-protected-resource/mcp",
}

# Calls that need a key and one of these roles; the owner rules for single tasks are below.
role_calls := {
	"POST /v1/tasks": ["user"],
	"GET /v1/tasks": ["user", "operator", "auditor"],
	"GET /v1/agents": ["*"],
	"GET /v1/agents/{name}": ["*"],
	"GET /v1/decisions": ["auditor"],
	"GET /v1/decisions/verify": ["auditor"],
	"GET /v1/decisions/{decision_id}": ["auditor"],
	"GET /v1/status": ["operator"],
	"POST /v1/admin/reload": ["operator"],
	"POST /v1/admin/mode": ["operator"],
	"POST /v1/admin/identity/rotate": ["operator"],
	# MCP: any key may speak the protocol; which tools it sees and may call is the
	# dispatch policy's answer (params.rpc is the JSON-RPC method, params.tool the tool).
	"POST /mcp": ["*"],
	"DELETE /mcp": ["*"],
}

# Calls on one task: who may make them besides the task's owner.
task_calls := {
	"GET /v1/tasks/{task_id}": {"owner_roles": ["*"], "others": ["operator", "auditor"]},
	"DELETE /v1/tasks/{task_id}": {"owner_roles": ["user"], "others": ["operator"]},
	"GET /v1/tasks/{task_id}/events": {"owner_roles": ["*"], "others": ["operator", "auditor"]},
}

known_call if call in public_calls

known_call if role_calls[call]

known_call if task_calls[call]

# --- refusals -------------------------------------------------------------------------

deny contains msg if {
	not known_call
	msg := sprintf("no rule allows %s", [call])
}

deny contains "this call needs an API key" if {
	known_call
	not call in public_calls
	not authenticated
}

deny contains msg if {
	authenticated
	wanted := role_calls[call]
	not "*" in wanted
	not has_any(wanted)
	msg := sprintf("%s needs one of the roles %v", [call, wanted])
}

owner if input.resource.owner == input.subject.id

may_as_owner(rule) if {
	owner
	"*" in rule.owner_roles
}

may_as_owner(rule) if {
	owner
	has_any(rule.owner_roles)
}

may_on_task(rule) if may_as_owner(rule)

may_on_task(rule) if has_any(rule.others)

deny contains msg if {
	authenticated
	rule := task_calls[call]
	owner
	not may_on_task(rule)
	msg := sprintf("%s on your own task needs one of the roles %v", [call, rule.owner_roles])
}

deny contains msg if {
	authenticated
	rule := task_calls[call]
	not owner
	not may_on_task(rule)
	msg := sprintf("task %s belongs to another subject; %s needs one of the roles %v", [input.resource.id, call, rule.others])
}

# --- A2A: POST /a2a/{agent} is decided per JSON-RPC method --------------------------------

a2a if input.request.protocol == "a2a"

a2a_call := sprintf("A2A %s", [input.request.params.method]) if a2a

a2a_role_calls := {
	"A2A SendMessage": ["user"],
	"A2A SendStreamingMessage": ["user"],
	"A2A ListTasks": ["user", "operator", "auditor"],
	"A2A GetExtendedAgentCard": ["*"],
}

a2a_task_calls := {
	"A2A GetTask": {"owner_roles": ["*"], "others": ["operator", "auditor"]},
	"A2A SubscribeToTask": {"owner_roles": ["*"], "others": ["operator", "auditor"]},
	"A2A CancelTask": {"owner_roles": ["user"], "others": ["operator"]},
	"A2A CreateTaskPushNotificationConfig": {"owner_roles": ["user"], "others": []},
	"A2A GetTaskPushNotificationConfig": {"owner_roles": ["*"], "others": ["operator", "auditor"]},
	"A2A ListTaskPushNotificationConfigs": {"owner_roles": ["*"], "others": ["operator", "auditor"]},
	"A2A DeleteTaskPushNotificationConfig": {"owner_roles": ["user"], "others": []},
}

known_call if a2a_role_calls[a2a_call]

known_call if a2a_task_calls[a2a_call]

deny contains msg if {
	a2a
	not a2a_role_calls[a2a_call]
	not a2a_task_calls[a2a_call]
	msg := sprintf("no rule allows %s", [a2a_call])
}

deny contains msg if {
	authenticated
	wanted := a2a_role_calls[a2a_call]
	not "*" in wanted
	not has_any(wanted)
	msg := sprintf("%s needs one of the roles %v", [a2a_call, wanted])
}

deny contains msg if {
	authenticated
	rule := a2a_task_calls[a2a_call]
	owner
	not may_on_task(rule)
	msg := sprintf("%s on your own task needs one of the roles %v", [a2a_call, rule.owner_roles])
}

deny contains msg if {
	authenticated
	rule := a2a_task_calls[a2a_call]
	not owner
	not may_on_task(rule)
	msg := sprintf("task %s belongs to another subject; %s needs one of the roles %v", [input.resource.id, a2a_call, rule.others])
}

conceal if {
	a2a_task_calls[a2a_call]
	not sees_task
}

# Webhooks only to public addresses, unless the host is in
# data.config.a2a.push_allowed_hosts (e.g. a receiver on this machine in a test).
push_allowed_host(host) if host in object.get(data.config, ["a2a", "push_allowed_hosts"], [])

deny contains msg if {
	a2a
	push := input.request.params.push
	not push.scheme in {"http", "https"}
	msg := sprintf("a push notification URL must be http or https, not %q", [push.scheme])
}

deny contains msg if {
	a2a
	push := input.request.params.push
	count(push.addresses) == 0
	msg := sprintf("the push notification host %q does not resolve", [push.host])
}

deny contains msg if {
	a2a
	push := input.request.params.push
	not push_allowed_host(push.host)
	some address in push.addresses
	not address.public
	msg := sprintf("push notifications may not go to %s: %s is not a public address", [push.host, address.ip])
}

# --- the answer -----------------------------------------------------------------------

# A caller who may not see a task is told it does not exist, so task ids leak nothing.
sees_task if owner

sees_task if has_any(task_calls["GET /v1/tasks/{task_id}"].others)

default conceal := false

conceal if {
	task_calls[call]
	not sees_task
}

# Operators and auditors list every task; everyone else only their own.
scope := "all" if has_any(["operator", "auditor"])

else := "own"

decision := {
	"allow": count(deny) == 0,
	"reasons": sort([r | some r in deny]),
	"scope": scope,
	"conceal": conceal,
}
