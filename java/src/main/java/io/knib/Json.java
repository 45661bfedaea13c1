package io.knib;

import com.google.gson.FieldNamingPolicy;
import com.google.gson.Gson;
import com.google.gson.GsonBuilder;

/** The JSON of requests and answers: Java field {@code deltaPathOnPrimary} is JSON {@code delta_path_on_primary}; null fields are left out. */
final class Json {
    static final Gson GSON = new GsonBuilder()
            .setFieldNamingPolicy(FieldNamingPolicy.LOWER_CASE_WITH_UNDERSCORES)
            .disableHtmlEscaping()
            .create();

    private Json() {}
}
