//! contractor-vm.
