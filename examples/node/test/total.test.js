'use strict';
const test = require('node:test');
const assert = require('node:assert');
const { total } = require('..');

test('adds durations of different units', () => {
  assert.strictEqual(total(['1h', '30m', '1800s']), '2h');
});

test('an empty list is no time', () => {
  assert.strictEqual(total([]), '0ms');
});

test('what is not a duration is refused, naming it', () => {
  assert.throws(() => total(['soon']), /not a duration: "soon"/);
});
