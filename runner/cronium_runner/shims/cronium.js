'use strict';
// Cronium runtime helpers for Node.js, installed by cronium-runner into the run's .cronium/ dir.
// require('cronium') or the global `cronium`: input(), output(data), getVariable(key),
// setVariable(key, value), setCondition(bool), event() (+ snake_case). All synchronous;
// `await cronium.getVariable('k')` works too. Writes go through the cronium.* commands (file lock).
const fs = require('fs');
const path = require('path');
const cp = require('child_process');

const STATE = process.env.CRONIUM_HELPER_DIR || path.dirname(__dirname);
const BIN = __dirname;

function api() {
  return process.env.CRONIUM_HELPER_MODE === 'api' &&
    !!(process.env.CRONIUM_RUNTIME_API || process.env.CRONIUM_API_ENDPOINT);
}

function call(cmd, args, stdin) {
  const out = cp.execFileSync(path.join(BIN, 'cronium.' + cmd), ['--json'].concat(args), {
    input: stdin === undefined ? '' : stdin,
    encoding: 'utf8',
    stdio: ['pipe', 'pipe', 'inherit'],
    maxBuffer: 1 << 30,
  });
  return out.trim() === '' ? null : JSON.parse(out);
}

function load(name) {
  try {
    return JSON.parse(fs.readFileSync(path.join(STATE, name), 'utf8'));
  } catch (e) {
    return null;
  }
}

function encode(v) {
  return JSON.stringify(v === undefined ? null : v);
}

const cronium = {
  input() {
    if (api()) return call('input', []);
    const d = load('input.json');
    return d && d.data !== undefined ? d.data : null;
  },
  output(data) {
    call('output', [], encode(data));
  },
  getVariable(key) {
    if (api()) return call('getVariable', [String(key)]);
    const vars = load('variables.json') || {};
    return Object.prototype.hasOwnProperty.call(vars, String(key)) ? vars[String(key)] : null;
  },
  setVariable(key, value) {
    call('setVariable', [String(key)], encode(value));
  },
  setCondition(condition) {
    call('setCondition', [condition ? 'true' : 'false']);
  },
  event() {
    if (api()) return call('event', []);
    return load('context.json') || {};
  },
};
cronium.get_input = cronium.getInput = cronium.input;
cronium.set_output = cronium.setOutput = cronium.output;
cronium.get_variable = cronium.getVariable;
cronium.set_variable = cronium.setVariable;
cronium.set_condition = cronium.setCondition;
cronium.context = cronium.getContext = cronium.get_event = cronium.getEvent = cronium.event;

module.exports = cronium;
globalThis.cronium = cronium;
