'use strict';
// The total of a list of durations ("1h", "30m", "90s"), written back the short way.
const ms = require('ms');

function total(durations) {
  const sum = durations.reduce((acc, d) => {
    const value = ms(d);
    if (typeof value !== 'number') {
      throw new Error(`not a duration: ${JSON.stringify(d)}`);
    }
    return acc + value;
  }, 0);
  return ms(sum);
}

module.exports = { total };
