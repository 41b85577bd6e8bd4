/* ktls: to be written */
