"use strict";

// eslint's own recommended rules (from @eslint/js, which eslint depends on), for CommonJS.
const js = require("@eslint/js");

module.exports = [
  js.configs.recommended,
  {
    files: ["**/*.js"],
    languageOptions: {
      ecmaVersion: 2022,
      sourceType: "commonjs",
      globals: { require: "readonly", module: "writable", console: "readonly" },
    },
    rules: { "prefer-const": "error", eqeqeq: "error" },
  },
];
