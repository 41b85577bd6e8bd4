/* smtp_parse: to be written */
